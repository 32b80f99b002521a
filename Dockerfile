# memdetect on CPU. Build: docker build -t memdetect .   Run: docker run --rm -v "$PWD:/data" memdetect scan /data
# For a GPU image, start from a CUDA PyTorch base image instead and drop the CPU index line.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
WORKDIR /opt/memdetect

# torch first, from the CPU wheel index, so that the project's `torch` requirement does not pull CUDA builds
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

COPY pyproject.toml README.md ./
COPY memdetect ./memdetect
COPY examples ./examples
RUN pip install ".[parquet]" && memdetect --help > /dev/null

WORKDIR /data
ENTRYPOINT ["memdetect"]
CMD ["--help"]
