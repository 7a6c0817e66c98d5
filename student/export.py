"""`cli.py export RUN --out model.safetensors`: a trained student as plain timm weights.

Writes two files:

    OUT                  the student's state_dict as safetensors (the EMA weights when the run kept
                         them, else, or with --no-ema, the raw ones)
    config.json beside   timm's own model config (``timm.models.save_config_for_hf``): architecture,
                         model_args (the kwargs that rebuild it, num_classes included), label_names,
                         and a pretrained_cfg holding the evaluation preprocessing of the run's recipe
                         (input size, mean, std, crop_pct, interpolation)

so that timm alone loads it, either from the folder::

    timm.create_model("local-dir:DIR", pretrained=True)     # DIR/config.json + DIR/model.safetensors

or, with any file name, from the config's parts::

    cfg = json.load(open("config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="model.safetensors"),
                              **cfg["model_args"])
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

(the overlay carries num_classes: without it timm compares the file with the architecture's
default 1000 classes and drops the heads). In eval mode a distilled DeiT returns the average of
its two heads, which is what ``cli.py train``'s evaluation calls the "avg" head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from storage import checkpoint
from storage.checkpoint import TrainCheckpoint
from storage.fsutil import fsync_path
from storage.outputs import OutputError, check_output_path

from .errors import TrainError
from .results import TrainSummary

CONFIG_NAME = "config.json"


@dataclass
class Exported:
    weights: str
    config: str
    architecture: str
    which: str          # "ema" or "model"
    tensors: int
    num_classes: int
    why: str = ""       # why these weights: the default, --no-ema, or a run without EMA
    val_top1: dict | None = None  # {"ema": %, "model": %}: the averaged head's last validation, when recorded

    def report(self) -> str:
        """What `cli.py export` prints: the files, which weights and why, and what they scored."""
        name = {"ema": "EMA", "model": "raw"}
        lines = [f"wrote {self.weights} ({self.which} weights of {self.architecture}, {self.tensors} tensors, "
                 f"{self.num_classes} classes) and {self.config}", f"weights: {self.why}"]
        if self.val_top1:
            scores = ", ".join(f"{name[k]} {v:.2f}%" + (" (exported)" if k == self.which else "")
                               for k, v in self.val_top1.items())
            lines.append(f"validation top-1 (averaged heads) at the last epoch: {scores}; train's final line "
                         "reports the raw weights")
        return "\n".join(lines)


def _read_checkpoint(run: str) -> TrainCheckpoint:
    path = run if os.path.isfile(run) else os.path.join(run, checkpoint.FILENAME)
    if not os.path.isfile(path):
        raise TrainError(f"export: no {checkpoint.FILENAME} in {run}; pass a run directory of `cli.py train`")
    obj = checkpoint.load_data(path, context=f"export: {path} is not a readable checkpoint", error=TrainError,
                               fix="pass a run directory of `cli.py train`")
    if checkpoint.missing(obj, (checkpoint.MODEL, checkpoint.CONFIG)):
        raise TrainError(f"export: {path} is not a checkpoint written by `cli.py train` (no model and config)")
    return TrainCheckpoint.from_dict(obj, path)


def _last_val_top1(ckpt: TrainCheckpoint, run: str) -> dict | None:
    """The averaged head's top-1 of the raw and EMA weights at the checkpoint's epoch, from RUN/summary.json
    (None without validation, or when the summary is not of this checkpoint: a run stopped mid-way)."""
    folder = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    try:
        summary = TrainSummary.read(folder)
        if summary.step != ckpt.step:
            return None
        scores = {"ema": summary.final.val_ema, "model": summary.final.val}
        out = {k: float(v["avg_top1"]) for k, v in scores.items() if isinstance(v, dict) and "avg_top1" in v}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # informational only: a damaged file
        return None
    return out or None


def _weights_choice(ckpt: TrainCheckpoint, ema: bool) -> tuple[str, str]:
    """("ema" | "model", why) for export's --ema/--no-ema and what the run kept."""
    if not ema:
        return "model", "the raw weights, as --no-ema asks"
    if ckpt.ema is not None:
        return "ema", "the EMA of the weights, the default when the run kept one; --no-ema exports the raw weights"
    return "model", "the raw weights: the run kept no EMA (trained with --no-ema)"


def _share_mode(path: str) -> None:
    """The mode a plain file write gets (0666 less the umask), whatever the writer used (safetensors: 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _recipe_and_classes(ckpt: TrainCheckpoint):
    """The run's recipe and class names: saved in the checkpoint, or (older runs) re-read from its store/source."""
    from pipeline.recipes import Recipe, create_recipe

    cfg = ckpt.config
    if ckpt.recipe is not None and ckpt.class_names is not None:
        return Recipe.from_dict(ckpt.recipe), list(ckpt.class_names)
    try:
        if cfg.get("labels"):
            from pipeline.sources import stored_manifest
            from storage import open_store

            reader = open_store(cfg["labels"])
            return Recipe.from_dict(reader.spec.recipe), stored_manifest(reader).class_names
        from pipeline.sources import index_source

        overrides = list(cfg.get("overrides") or [])
        overrides += [f"input_size={cfg['input_size']}"] if cfg.get("input_size") else []
        overrides += [f"repeats={cfg['repeats']}"] if cfg.get("repeats") is not None else []
        recipe = create_recipe(cfg.get("recipe") or "deit", overrides)
        return recipe, index_source(cfg["data"], shard_size=cfg.get("shard_size", 1024)).class_names
    except Exception as e:  # noqa: BLE001 - any reason the old store/source cannot be read
        where = cfg.get("labels") or cfg.get("data")
        raise TrainError(f"export: this checkpoint predates saved recipes and its store/source {where} cannot be "
                         f"read ({type(e).__name__}); make it reachable at that path and rerun") from None


def export_run(run: str, out: str, *, ema: bool = True, config_path: str | None = None) -> Exported:
    """Write OUT (safetensors) and config.json beside it (or at ``config_path``). Raises TrainError, or
    OutputError (before reading anything) for an output that would land on an input or inside a run."""
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    config_path = config_path or os.path.join(os.path.dirname(os.path.abspath(out)), CONFIG_NAME)
    inputs = (run, os.path.join(run, checkpoint.FILENAME))
    # Before reading anything: neither file may land on the checkpoint, the run folder or each other.
    check_output_path(out, "safetensors", inputs=inputs)  # timm also picks its loader by the extension
    if os.path.realpath(config_path) == os.path.realpath(out):
        raise OutputError(f"export: --config {config_path} and --out name the same file; the weights and the "
                          "config are two files, e.g. --config config.json beside --out")
    check_output_path(config_path, "json", option="--config", inputs=inputs)
    ckpt = _read_checkpoint(run)
    cfg = ckpt.config
    which, why = _weights_choice(ckpt, ema)
    state = ckpt.ema if which == "ema" else ckpt.model
    recipe, class_names = _recipe_and_classes(ckpt)
    # Rebuild arguments only: the class count comes from the data, drop rates are training-time settings.
    kwargs = {k: v for k, v in (cfg.get("model_kwargs") or {}).items()
              if k != "num_classes" and not k.endswith("drop_rate")}
    try:
        model = timm.create_model(cfg["model"], num_classes=len(class_names), **kwargs)
        model.load_state_dict(state)  # strict: the weights must rebuild exactly this architecture
    except Exception as e:  # noqa: BLE001 - a timm/torch error naming what does not match
        raise TrainError(f"export: cannot rebuild {cfg['model']} with {kwargs} from {run} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    data_config = {"input_size": (3, recipe.input_size, recipe.input_size), "mean": tuple(recipe.mean),
                   "std": tuple(recipe.std), "crop_pct": recipe.eval_crop_pct, "interpolation": recipe.interpolation,
                   "crop_mode": "center"}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(config_path)), exist_ok=True)
    # Each file appears whole or not at all: written beside, fsynced, renamed into place (as storage.fsutil).
    tmp_w, tmp_c = f"{out}.tmp{os.getpid()}", f"{config_path}.tmp{os.getpid()}"
    try:
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, tmp_w, metadata={"format": "pt", "architecture": cfg["model"], "weights": which})
        save_config_for_hf(model, tmp_c, model_config={"label_names": list(class_names),
                                                        # not the architecture's default tag (e.g. DeiT's fb_in1k)
                                                        "pretrained_cfg": {"tag": "deit_lockstep"}},
                           model_args=kwargs, data_config=data_config)
        for tmp, final in ((tmp_w, out), (tmp_c, config_path)):  # on disk before the name says it is there
            _share_mode(tmp)  # both files are what a user shares: the same mode as any file they write
            fsync_path(tmp)
            os.replace(tmp, final)
        for folder in {os.path.dirname(os.path.abspath(p)) for p in (out, config_path)}:
            fsync_path(folder)
    finally:
        for tmp in (tmp_w, tmp_c):
            if os.path.exists(tmp):
                os.remove(tmp)
    return Exported(out, config_path, cfg["model"], which, len(tensors), len(class_names), why,
                    _last_val_top1(ckpt, run))

