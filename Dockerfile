# memdetect on CPU, as a non-root user (README.md, "Docker").
#   Build:       docker build -t memdetect .            (--build-arg UID=$(id -u) to own what it writes to your files)
#   Quick start: docker run --rm memdetect scan examples/demo --model demo --output demo-report.csv
#   Your images: docker run --rm -v "$PWD:/data" -v memdetect-cache:/home/memdetect/.cache \
#                    memdetect scan /data --model sd14 --output /data/report.csv
# /home/memdetect/.cache holds the Hugging Face cache (model weights, HF_HOME) and memdetect's state: mount a volume
# there so that weights are downloaded once. For a GPU image, start from a CUDA PyTorch base image instead and drop
# the CPU index line.
FROM python:3.11-slim

ARG UID=1000
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg \
    HF_HOME=/home/memdetect/.cache/huggingface

# torch first, from the CPU wheel index, so that the project's `torch` requirement does not pull CUDA builds
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

WORKDIR /opt/memdetect-src
COPY pyproject.toml README.md ./
COPY memdetect ./memdetect
# hadolint ignore=DL3013
RUN pip install ".[parquet]" && memdetect --help > /dev/null

# the user, and a working folder holding the examples: the README's quick start runs as written
RUN useradd --create-home --uid "${UID}" --shell /usr/sbin/nologin memdetect \
    && mkdir -p /home/memdetect/.cache/huggingface \
    && chown -R memdetect:memdetect /home/memdetect/.cache
WORKDIR /home/memdetect/work
COPY --chown=memdetect:memdetect examples ./examples
RUN chown memdetect:memdetect /home/memdetect/work
USER ${UID}
VOLUME ["/home/memdetect/.cache"]

ENTRYPOINT ["memdetect"]
CMD ["--help"]
