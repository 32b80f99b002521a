"""The commands' options, declared once as ``Annotated`` aliases (as huggingface_hub's CLI does): the ones several
commands share and the long ones of one command, so a command's signature reads one line an option; and the parsing
they need: which options were typed, flags merged with ``--config``, prompts and class lists."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from ..core.scores import SCORES
from ..errors import UsageError

if TYPE_CHECKING:
    from ..config import ScanSettings

Paths = Annotated[List[Path], typer.Argument(help="Image files and/or folders (searched recursively).",
                                             show_default=False)]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Required: a preset (see `memdetect models`), "
                                              "family (with --model-path), hub id or local diffusers folder (or a "
                                              "--config that names one).", show_default=False)]
ModelPath = Annotated[Optional[Path], typer.Option("--model-path", help="Local weights for the preset or family (a "
                                                                        "diffusers folder, or an EDM checkpoint).")]
# help texts are rich markup: "\\[" is a literal bracket ("[@CALL]" alone would be read as a tag and vanish)
Layer = Annotated[Optional[str], typer.Option("--layer", help="NAME[:in]\\[@CALL]; default: the model's paper "
                                                               "layer.")]
Timestep = Annotated[Optional[int], typer.Option("--timestep", "-t", help="DDPM timestep to noise to (default: 50).")]
Sigma = Annotated[Optional[float], typer.Option("--sigma", help="EDM, SD3, Flux: noise level sigma instead of the "
                                                                "--timestep's (EDM: t=50 is 0.176; flow models: s in "
                                                                "(0, 1), see `memdetect models`).")]
Metric = Annotated[str, typer.Option("--metric", help=f"Score column: {', '.join(SCORES)}.")]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="Flag images whose score is >= this.")]
Seed = Annotated[int, typer.Option("--seed", help="Noise seed (an image's noise depends on this and its pixels).")]
Draws = Annotated[int, typer.Option("--draws", help="Noise draws per image: the score is the mean over this many "
                                    "seeded draws (1 to 64; each costs one more denoiser pass per image).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per forward pass (default: per "
                                                                             "model and device).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (meta: shapes only, for `layers` "
                                                      "of sdxl/sd3/flux/pixart configs without weights).")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, float16, "
                                                    "bfloat16.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Image-decoding worker processes.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, table or summary (files are still "
                                                           "written).")]
Config = Annotated[Optional[Path], typer.Option("--config", "-c", help="memdetect.toml from `memdetect calibrate`: "
                                                "model, layer, timestep, seed, metric and threshold (flags may not "
                                                "contradict it; --threshold, --metric and --model-path may override).")]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the report's journal "
                                      "(<output>.journal.jsonl): images already scored with the same settings and "
                                      "weights are not scored again (only rows signed with this state directory's "
                                      "secret are trusted).")]
StateDirOption = Annotated[Optional[Path], typer.Option("--state-dir", envvar="MEMDETECT_STATE_DIR",
                           help="memdetect's private state: the journal secret, audit journals, weight hashes "
                                "(default: $XDG_CACHE_HOME/memdetect/state or ~/.cache/memdetect/state).")]
Inputs = Annotated[List[str], typer.Argument(help="Image files, folders (searched recursively), fsspec URLs (s3://, "
                                             "gs://, hf://, memory://, file://), .tar shards (one row per image "
                                             "member) and .csv / .parquet manifests (a path or url column).",
                                             show_default=False)]
AllowRemote = Annotated[bool, typer.Option("--allow-remote", help="Read inputs and manifest rows that are URLs other "
                        "than file:// (s3://, gs://, hf://, http://, ftp:// ...; off: such a manifest row is an error "
                        "row, such an input a usage error). Config key: allow_remote.")]
Html = Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report (histogram, "
                                                             "evidence for the top flagged images, a sortable table "
                                                             "of every image, settings).")]
Fpr = Annotated[Optional[float], typer.Option("--fpr", help="Instead of a threshold: flag at most this fraction of "
                                              "the config's reference images (needs --config).")]
EvidenceTop = Annotated[int, typer.Option("--evidence-top", min=0, help="Flagged images (highest score first) that "
                                          "get evidence in the HTML report and --evidence-json: top channels, "
                                          "activation map, place among the reference scores.")]
EvidenceJson = Annotated[Optional[Path], typer.Option("--evidence-json", help="Write the evidence of the top "
                                                      "flagged images as JSON.")]
ReferenceDir = Annotated[Optional[Path], typer.Option("--reference-dir", help="Copy search: a folder of images (e.g. "
                         "a sample of the training set); each image with evidence gets its nearest ones by the "
                         "model's features and by pixels.")]

#: Where a scan runs (``scan``).
Shard = Annotated[Optional[str], typer.Option("--shard", help="I/N: score only the I-th of N contiguous parts of the "
                                              "inputs (Slurm arrays, indexed jobs); join the reports with `memdetect "
                                              "merge`.")]
Engine = Annotated[str, typer.Option("--engine", help="local (this process; under torchrun or accelerate launch, one "
                                     "part per rank) or ray (a Ray Data actor pool).")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="--engine ray: the cluster to join (default: "
                                                   "RAY_ADDRESS, else a local Ray).")]
#: The CI outputs (``audit``).
Junit = Annotated[Optional[Path], typer.Option("--junit", help="Write JUnit XML: one test case per image, a failure "
                                               "per flagged image, unreadable files skipped.")]
SummaryJson = Annotated[Optional[Path], typer.Option("--summary-json", help="Write a JSON summary: counts, exit code, "
                                                     "flagged images, errors, settings.")]
Annotations = Annotated[str, typer.Option("--annotations", help="GitHub workflow annotations on stdout: auto (when "
                                          "GITHUB_ACTIONS=true), github, none.")]
ShardKeyFile = Annotated[Optional[Path], typer.Option("--shard-key-file", help="A shared secret (default: "
                         "$MEMDETECT_SHARD_KEY): `scan --shard` signs its report with it (HMAC-SHA256) and `merge` "
                         "refuses a shard whose MAC is missing or does not verify.")]


Prompts = Annotated[Optional[List[str]], typer.Option("--prompt", "-p", help="A prompt (text models; repeatable).")]
Classes = Annotated[Optional[str], typer.Option("--class", help="Class indices, comma-separated (class models).")]
PromptFile = Annotated[Optional[Path], typer.Option("--prompt-file", help="Prompts, one per line (or csv/json/jsonl).")]
GuardImages = Annotated[int, typer.Option("--num-images", "-n", min=1, help="Images per prompt or class (or in all, "
                                                                             "unconditional).")]
GuardSteps = Annotated[Optional[int], typer.Option("--steps", min=1, help="Sampling steps (default: the family's).")]
Guidance = Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale (SD 7.5, "
                                                                      "DiT 4).")]
StepT = Annotated[int, typer.Option("--step-t", min=0, help="Guard at the sampling step whose timestep is nearest "
                                                            "this.")]

# the benches
FlipdProbes = Annotated[int, typer.Option("--flipd-probes", min=1, help="Hutchinson probes for Ross et al.'s "
                                                                        "FLIPD.")]
GenerationSeed = Annotated[int, typer.Option("--seed", help="Generation seed.")]
GenerationBatch = Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="Samples per generation "
                                                        "and scoring batch (default: the model's batch size).")]
BenchOutput = Annotated[Optional[Path], typer.Option("--output", "-o", help="Results folder (a rerun resumes it; "
                                                                            "default: bench-<name>).")]
TrainDir = Annotated[Path, typer.Option("--train-dir", help="The model's training images (a folder, searched "
                                                            "recursively), for nearest-neighbour labels.")]
NumSamples = Annotated[int, typer.Option("--num-samples", "-n", min=2, help="Samples to generate.")]
MemorizedAt = Annotated[Optional[float], typer.Option("--memorized-at", help="Memorized at nearest-neighbour "
                                                   "similarity >= this (default: the labeller's: pixel 0.95, sscd "
                                                   "0.9).")]
GeneralizedBelow = Annotated[Optional[float], typer.Option("--generalized-below", help="Generalized below this "
                                                           "(between: excluded) (default: pixel 0.80, sscd 0.5).")]
Bootstrap = Annotated[int, typer.Option("--bootstrap", min=20, help="Bootstrap replicates of the 95% intervals.")]
FlipdTimestep = Annotated[Optional[int], typer.Option("--flipd-timestep", min=0, help="Timestep of Ross et al.'s "
                                                      "FLIPD (default: the detector's).")]
LabelResolution = Annotated[Optional[int], typer.Option("--label-resolution", min=4, help="Resolution of the "
                                                        "nearest-neighbour comparison (default: min(model, 64)).")]
Steps = Annotated[Optional[int], typer.Option("--steps", min=1, help="Sampling steps (default: the family's: DiT 50 "
                                              "DDIM, pixel DDPM 1000 ancestral, EDM 18 Heun).")]


def _given(ctx: typer.Context) -> set[str]:
    """The options typed on the command line (not defaults): a config fills in only the others.

    Compared by name: recent typer versions vendor their own click, with their own ``ParameterSource`` enum.
    """
    return {n for n in ctx.params
            if getattr(ctx.get_parameter_source(n), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}


def scan_settings(ctx: typer.Context, config: Optional[Path], *, config_sha256: Optional[str] = None,
                  **flags) -> "ScanSettings":
    """Model, layer, timestep, sigma, seed, draws, metric, threshold, model_path: flags merged with ``--config`` (read only
    when given; ``config_sha256``: its pinned SHA-256). The command line wins over the file."""
    from ..config import ScanSettings, check_sha256, load_config

    if config_sha256 is not None:
        check_sha256(config_sha256)
        if not config:
            raise UsageError("--config-sha256 needs --config: it pins the config file's bytes")
    return ScanSettings.from_sources(load_config(config, sha256=config_sha256) if config else None, flags,
                                     _given(ctx))


def _conditions(prompts, classes, prompt_file):
    conditions = list(prompts or [])
    if prompt_file:
        from ..store.prompts import read_prompts
        conditions += [str(p) for p in read_prompts(prompt_file)["prompt"]]
    if classes:
        if conditions:
            raise UsageError("give prompts or classes, not both")
        conditions = _parse_classes(classes)
    return conditions or None


def _parse_classes(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    classes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise UsageError(f"--classes takes comma-separated class indices or ranges (0-9), got {text!r}")
        classes.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return classes
