"""Feature extraction: run an image encoder over a set of images into a feature store
(:mod:`captioner.data.features`), resumably.

A rerun computes only the rows still to do; an existing store is finished only with the same
images, encoder and precision. The store's files are reserved on disk before any image is encoded.

Under torchrun (one node), every process fills the same files: rank r encodes the rows i with
i % world == r; rank 0 creates or checks the store first and writes meta.json last, after a barrier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from captioner.data.features import FeatureStoreError
from captioner.data.features import images_to_encode  # noqa: F401 - here before it moved (torch-free there)
from captioner.data.images import DEFAULT_MAX_PIXELS
from captioner.encoders.network import ImageEncoder, get_encoder_spec
from captioner.encoders.quick_features import features_key, remember_features
from captioner.encoders.runtime import OnnxImageEncoder, default_threads, resolve_runtime, store_precision, with_runtime
from captioner.encoders.store_fill import (DecodeDataset, collate, encoded_batch, fill_rows, fill_store,
                                           threaded_batches)
from captioner.encoders.tail import TailError, trunk_dims
from captioner.runtime.devices import check_precision, resolve_device
from captioner.runtime.distributed import env_world, one_node, process_group
from captioner.runtime.workers import check_workers, worker_init


def extract_features(
    image_root: str | Path,
    images: Sequence[str],
    out_dir: str | Path,
    *,
    encoder: str = "efficientnet-lite0",
    resize: str | None = None,
    image_size: int | None = None,
    batch_size: int = 8,
    workers: int = 1,
    max_pixels: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    limit_batches: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    cut: int = 0,
    grid: int | None = None,
    runtime: str = "auto",
    calibration: str | Path | None = None,
) -> dict:
    """Compute (or finish computing) the features of ``images`` into ``out_dir``.

    Returns a summary: rows computed now, rows already done, failures, images/s.
    ``limit_batches`` stops after that many batches (for tests and benchmarks).
    ``device`` runs the encoder there (cpu, cuda, auto); ``precision="bf16"`` under bfloat16 autocast
    (recorded in meta.json: a store is finished in the precision it was started in).
    ``runtime`` runs the encoder (:mod:`captioner.encoders.runtime`; onnx-int8, calibrated on the images of
    the folder ``calibration``, is recorded as precision int8: such a store is finished only with it).
    Under torchrun (WORLD_SIZE > 1, one node) each process encodes every WORLD_SIZE-th image into the
    same store, which ends up exactly as a single-process run leaves it.
    ``cut`` > 0 makes a trunk store: the maps before the encoder's last ``cut`` units
    (:mod:`captioner.encoders.tail`), what fine-tuning those units trains on. With ONNX Runtime (fp32, one process)
    it leaves the hint from which the next such run works without torch (:mod:`captioner.encoders.quick_features`).
    """
    check_workers(workers)
    dev = resolve_device(device)  # a GPU that is not there: an error before any file is touched
    check_precision(precision, dev)
    runtime = resolve_runtime(runtime, dev, precision, calibration)  # an unusable one: before any file
    _, world = env_world()
    if world > 1 and not one_node(world):
        raise FeatureStoreError(
            f"{out_dir}: feature extraction runs its ranks on one machine (they write one shared memory-mapped "
            f"store), but torchrun started {world} processes over several nodes; use `torchrun --standalone "
            "--nproc_per_node N` on one node, or one store per node (each with its own --splits)")
    with process_group() as group:
        return _extract(group, image_root, images, out_dir, encoder=encoder, resize=resize, image_size=image_size,
                        batch_size=batch_size, workers=workers, max_pixels=max_pixels, overwrite=overwrite,
                        progress=progress, limit_batches=limit_batches, device=dev, precision=precision, cut=cut,
                        grid=grid, runtime=runtime, calibration=calibration)


def _extract(group, image_root, images, out_dir, *, encoder, resize, image_size, batch_size, workers, max_pixels,
             overwrite, progress, limit_batches, device, precision, cut=0, grid=None, runtime="torch",
             calibration=None) -> dict:
    """extract_features in one process of ``group``: rank r encodes the rows i with i % world == r
    (:func:`captioner.encoders.store_fill.fill_store`)."""
    root, out = Path(image_root), Path(out_dir)
    names = list(images)
    try:
        spec = get_encoder_spec(encoder, resize=resize, image_size=image_size, grid=grid)
    except ValueError as e:
        raise FeatureStoreError(str(e)) from None
    if max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    described = spec.to_dict()
    if cut:
        try:
            trunk_grid, trunk_channels = trunk_dims(spec, cut)
        except TailError as e:
            raise FeatureStoreError(f"--cut {cut}: {e}") from None
        described.update(cut=cut, trunk_grid=trunk_grid, trunk_channels=trunk_channels)

    def encode(todo: list[int], status: np.ndarray, feats: np.ndarray) -> tuple[int, int]:
        enc = with_runtime(ImageEncoder(spec, device=device, precision=precision, cut=cut), runtime,
                           calibration=calibration, threads=1 if runtime != "torch" else None)
        ds = DecodeDataset(root, names, todo, spec, max_pixels)
        onnx = isinstance(enc, OnnxImageEncoder)  # not when auto fell back to torch
        if onnx and not cut and group.world == 1:
            remember_features(features_key(encoder, resize, image_size, grid, runtime), enc, described)
        threads = default_threads()
        if onnx and threads > 1:
            # a session of one thread, called by as many threads as torch would use: each decodes and encodes its own
            batches = threaded_batches(_grids(enc), ds, batch_size, threads)
        else:  # the encoder's threads encode while `workers` processes decode (one thread: torchrun's default too)
            batches = _loader_batches(enc, ds, batch_size, workers)
        return fill_rows(enc.spec.name, ds, out, status, feats, batches, group=group, progress=progress,
                         limit_batches=limit_batches)

    return fill_store(group, root, names, out, described, store_precision(runtime, precision), overwrite, encode)


def _grids(enc) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images -> the encoder's grids as float32 numpy, on the CPU."""
    return lambda arrays: enc.encode_arrays(arrays).cpu().numpy()


def _loader_batches(enc, ds: DecodeDataset, batch_size: int, workers: int):
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
        worker_init_fn=worker_init() if workers > 0 else None,  # a worker ends with this process
    )
    grids = _grids(enc)
    for batch in loader:
        yield encoded_batch(grids, batch)
