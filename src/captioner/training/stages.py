"""Staged training (``then``): the later stages of a run, each a run of its own into ``{out_dir}-{name}``,
starting from the best/ of the stage before it, exactly as if it were its own config file."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from captioner.checks import shown
from captioner.config import deep_update, from_dict
from captioner.data.text import read_json_file, write_text_atomic
from captioner.files import METADATA_BYTES, WEIGHTS_BYTES, open_regular
from captioner.training.config import DataConfig, TrainConfig, TrainError, check_run
from captioner.inference.modeldir import resolve_model_path
from captioner.training.outdir import check_out_dir

STAGE_KEEPS = ("arch", "data", "threads", "device", "precision", "progress")  # what a stage takes from the run
STAGE_SETS = ("init_from", "out_dir", "model", "then", "arch", "threads", "device", "precision", "progress")


def stage_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """The stages of a run: ``cfg`` itself (without ``then``), then one per entry of ``cfg.then``, each
    trained from the best/ of the stage before it, into ``{out_dir}-{name}``. A stage takes the run's
    arch, data (an entry may change it) and machine settings (threads, device, precision, progress);
    every other setting is its default unless the entry sets it, exactly as if the stage were its own
    config file with ``init_from`` pointing at the previous stage."""
    stages = [dataclasses.replace(cfg, then=[])]
    kept = {k: v for k, v in asdict(stages[0]).items() if k in STAGE_KEEPS}
    out = Path(cfg.out_dir)
    if cfg.then and out.name in ("", ".", ".."):
        raise TrainError(f"out_dir={shown(cfg.out_dir)}: a run with stages (then) needs an out_dir with a name, "
                         "e.g. "
                         "runs/sat; its later stages go beside it, into runs/sat-<name>")
    names = set()
    for i, entry in enumerate(cfg.then):
        where = f"then[{i}]"
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise TrainError(f"{where}: a stage needs a name (letters, digits, - _ .), e.g. `- name: scst`; "
                             f"it trains into out_dir-name ({cfg.out_dir}-scst)")
        if name in names:
            raise TrainError(f"{where}: a second stage named {shown(name)}; each stage needs its own name (its "
                             "out_dir)")
        names.add(name)
        given = {k: v for k, v in entry.items() if k != "name"}
        fixed = sorted(set(given) & set(STAGE_SETS))
        if fixed:
            raise TrainError(f"{where} ({name}).{fixed[0]}: set by the run, not a stage: a stage starts from the "
                             "best/ of the one before (its architecture and sizes), trains into out_dir-name, "
                             "and runs where the run runs")
        merged = copy.deepcopy(kept)
        deep_update(merged, given)
        merged.update(init_from=str(Path(stages[-1].out_dir) / "best"),
                      out_dir=str(out.with_name(f"{out.name}-{name}")))
        stages.append(from_dict(TrainConfig, merged, where=f"{where} ({name})"))
    return stages


def check_stages(cfg: TrainConfig, stages: list[TrainConfig], world: int, resume: bool) -> None:
    """Every stage's mistakes before the first one trains: its settings, its data when it has its own, and
    an out_dir that already holds a run (unless ``resume``)."""
    tuned = 0
    for k, stage in enumerate(stages):
        try:
            check_run(stage, world, init_from_exists=k == 0)
            if stage.data != stages[0].data:  # a stage on other data: its files must be there
                _check_data_paths(stage.data)
        except ValueError as e:
            raise (TrainError(f"then[{k - 1}] ({cfg.then[k - 1]['name']}): {e}") if k else e) from None
        tuned = _check_trunk_store(cfg, k, stage, tuned if k else _tuned_units(stage.init_from))
        if not resume and (Path(stage.out_dir) / "last.pt").exists():
            raise TrainError(f"{stage.out_dir} already holds a training run (last.pt), and stage {k + 1} of this "
                             "run would write there; use --resume to continue the run, or another out_dir")
        if not (Path(stage.out_dir) / "last.pt").exists():
            check_out_dir(Path(stage.out_dir))


def _tuned_units(init_from: str) -> int:
    """How many of the encoder's last units the model directory ``init_from`` has tuned (0: none, or unreadable: its
    own checks report that)."""
    try:
        cfg = read_json_file(resolve_model_path(init_from) / "config.json", what="config.json",
                             max_bytes=METADATA_BYTES) if init_from else None
        units = ((cfg.get("encoder") or {}).get("tuned") or {}).get("units", 0) if isinstance(cfg, dict) else 0
        return units if isinstance(units, int) else 0
    except (ValueError, OSError):
        return 0


def _check_trunk_store(cfg: TrainConfig, k: int, stage: TrainConfig, tuned: int) -> int:
    """Stage ``k`` must train on a trunk store when it fine-tunes the encoder or starts from a model that did
    (``tuned`` units by the stages before it): checked before the first stage trains. Returns the units tuned after it."""
    need = max(stage.encoder.train_blocks, tuned)
    meta = Path(stage.data.features) / "meta.json"
    if need and meta.is_file():
        store = read_json_file(meta, what="the store's meta.json", max_bytes=METADATA_BYTES)
        cut = ((store.get("encoder") or {}).get("cut") or 0) if isinstance(store, dict) else 0
        if not isinstance(cut, int) or cut < need:
            where = f"then[{k - 1}] ({cfg.then[k - 1]['name']})" if k else "the run"
            why = (f"its encoder.train_blocks={stage.encoder.train_blocks}" if stage.encoder.train_blocks >= tuned
                   else f"it starts from a model whose encoder's last {tuned} units were fine-tuned")
            raise TrainError(f"{where}: {why}, so it trains on a trunk store cut at {need} units or more, but "
                             f"data.features={stage.data.features} is {'cut at ' + str(cut) if cut else 'a store of grids'}; "
                             f"make one with `captioner features --corpus CORPUS.json --out DIR --cut {need}` and set the "
                             "stage's data: {features: DIR}")
    return need


def _check_data_paths(data: DataConfig) -> None:
    """A stage with data of its own: its files must be there before the first stage trains."""
    for what, path, ok in (("data.corpus", data.corpus, Path.is_file), ("data.features", data.features, Path.is_dir),
                           ("data.vocab", data.vocab, Path.is_file)):
        if path and not ok(Path(path)):
            raise TrainError(f"{what}={path}: not found")


def same_start_model(stage: TrainConfig, rank: int) -> None:
    """A later stage records which best/ it started from (a hash of its weights); resumed after the stage
    before it trained on (``--resume optim.epochs=30``) and wrote a new best/, it would go on from the
    old one, so that is refused."""
    record = Path(stage.out_dir) / "started_from.json"
    digest = _sha256(Path(stage.init_from) / "model.safetensors")
    if record.exists() and (Path(stage.out_dir) / "last.pt").exists():
        recorded = read_json_file(record, what="the stage's record", max_bytes=METADATA_BYTES)
        if not isinstance(recorded, dict) or recorded.get("sha256") != digest:
            raise TrainError(f"{stage.out_dir} started from an earlier {stage.init_from} than the one there now "
                             "(the stage before it has trained on since and found a better model): remove "
                             f"{stage.out_dir} to train this stage again from the new one")
    elif rank == 0:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps({"init_from": stage.init_from, "sha256": digest}))


def _sha256(path: Path) -> str:
    """The SHA-256 of a regular file, read in pieces."""
    digest = hashlib.sha256()
    with open_regular(path, "the starting model's weights file", WEIGHTS_BYTES) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
