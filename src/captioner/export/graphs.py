"""The torch modules that become the exported ONNX graphs, and their export.

Three graphs, each with a dynamic batch axis:

- **encoder**: uint8 images ``(B, S, S, 3)`` (resized as the toolkit resizes) -> ``features`` ``(B, P, C)``, the
  normalisation inside; with the ImageNet concept head, a second output ``concept_confidences`` ``(B, W)``
  (softmax of the classifier over the grid's mean, summed per mapped word: :class:`~captioner.encoders.concepts.
  ConceptHead`);
- **decoder_encode**: ``features`` -> the decoder's memory (``memory_0``, ...) and its initial state
  (``state_0``, ...): ``decoder.encode`` then ``decoder.init_state`` (:mod:`captioner.models.base`);
- **decoder_step**: ``prev_tokens`` ``(B,)`` int64, ``state_*``, ``memory_*`` -> ``log_probs`` ``(B, V)`` and
  ``new_state_*``: one ``decoder.step``. A state axis that grows with the words (the transformer's cached keys
  and values) is found by running two steps, and is dynamic too (named ``past``).

ONNX Runtime leaves out the inputs a graph never reads (gru-residual's step does not read the grid's mean): a
caller feeds only the inputs the session lists.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Iterator

import torch
from torch import nn

from captioner.encoders.concepts import ConceptHead
from captioner.models.base import Decoder

OPSET = 17  # LayerNormalization is a single operator from 17 on


class EncoderGraph(nn.Module):
    """uint8 (B, S, S, 3) -> features (B, P, C)[, concept confidences (B, W)], as ``ImageEncoder.encode_all``
    computes them (the concept head's input: the pretrained units' pooled map when the net gives one, else the
    grid's mean)."""

    def __init__(self, net: nn.Module, mean, std, head: ConceptHead | None):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.has_head = head is not None
        if head is not None:
            self.register_buffer("head_weight", head.weight.float().clone())
            self.register_buffer("head_bias", head.bias.float().clone())
            self.register_buffer("to_words", head._to_words.float().clone())

    def forward(self, images: torch.Tensor):
        x = (images.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
        out = self.net(x)
        fmap, pooled = out if isinstance(out, tuple) else (out, None)
        features = fmap.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if not self.has_head:
            return features
        seen = features.mean(dim=1) if pooled is None else pooled.flatten(1)  # (B, C)
        probs = torch.softmax(seen @ self.head_weight.T + self.head_bias, dim=-1)
        return features, probs @ self.to_words


class DecoderEncodeGraph(nn.Module):
    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor):
        memory = self.decoder.encode(features)
        return (*memory, *self.decoder.init_state(memory))


class DecoderStepGraph(nn.Module):
    def __init__(self, decoder: Decoder, n_state: int):
        super().__init__()
        self.decoder, self.n_state = decoder, n_state

    def forward(self, prev_tokens: torch.Tensor, *state_and_memory: torch.Tensor):
        state, memory = state_and_memory[:self.n_state], state_and_memory[self.n_state:]
        log_probs, new_state, _ = self.decoder.step(prev_tokens, tuple(state), tuple(memory))
        return (log_probs, *new_state)


class UnsupportedModelError(ValueError):
    """The model holds an operation ONNX (at :data:`OPSET`) cannot express."""


def to_onnx(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]], what: str) -> bytes:
    """``module`` (kept in eval mode) as an ONNX model, traced on ``args``; ``what`` names it in errors."""
    module.eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the tracer's notes on shapes read as Python numbers: checked by the tests
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buf, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    except torch.onnx.errors.OnnxExporterError as e:  # e.g. a grid pooled to a size that does not divide the net's
        raise UnsupportedModelError(f"{what}: cannot be exported to ONNX opset {OPSET} ({e})") from None
    module.eval()  # the exporter puts the module back in the mode it found it in: stay in eval for the caller
    return buf.getvalue()


def _tensor_info(name: str, t: torch.Tensor, axes: dict[int, str]) -> dict:
    dtype = str(t.dtype).removeprefix("torch.")
    return {"name": name, "dtype": dtype, "shape": [axes.get(i, int(n)) for i, n in enumerate(t.shape)]}


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): row i averages the cells adaptive average pooling gives output i."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


@contextlib.contextmanager
def _grid_pooling(native: tuple[int, int], grid: tuple[int, int]) -> Iterator[None]:
    """While exporting an encoder that pools its (native) grid to ``grid`` (``encoder.grid``): adaptive average
    pooling as two products with constant averaging matrices. The exporter's own version needs the input's
    size, which it cannot see through the Lite nets' padding, and fails."""
    rows, cols = _pool_matrix(native[0], grid[0]), _pool_matrix(native[1], grid[1]).T.contiguous()

    def symbolic(g, x, output_size):
        return g.op("MatMul", g.op("MatMul", g.op("Constant", value_t=rows), x), g.op("Constant", value_t=cols))

    torch.onnx.register_custom_op_symbolic("aten::adaptive_avg_pool2d", symbolic, OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::adaptive_avg_pool2d", OPSET)


def export_encoder(net: nn.Module, spec, head: ConceptHead | None) -> tuple[bytes, dict]:
    """The encoder graph and its description (inputs, outputs: names, dtypes, shapes)."""
    graph = EncoderGraph(net, spec.mean, spec.std, head).eval()
    example = torch.zeros(2, spec.image_size, spec.image_size, 3, dtype=torch.uint8)
    with torch.no_grad():
        out = graph(example)
    outs = out if isinstance(out, tuple) else (out,)
    out_names = ["features", "concept_confidences"][:len(outs)]
    batch = {0: "batch"}
    native = (-(-spec.image_size // 32),) * 2  # the Lite nets downsample by 32
    pooled = tuple(spec.grid) != native
    with _grid_pooling(native, tuple(spec.grid)) if pooled else contextlib.nullcontext():
        data = to_onnx(graph, (example,), ["images"], out_names, {n: batch for n in ["images", *out_names]},
                       f"the encoder {spec.name}")
    info = {"inputs": [_tensor_info("images", example, batch)],
            "outputs": [_tensor_info(n, t, batch) for n, t in zip(out_names, outs)]}
    return data, info


def _growing_axes(before: tuple[torch.Tensor, ...], after: tuple[torch.Tensor, ...]) -> list[dict[int, str]]:
    """Per state tensor, its axes: the batch, and any axis whose size changed over a step (``past``)."""
    axes = []
    for a, b in zip(before, after):
        d = {0: "batch"}
        d.update({i: "past" for i in range(1, a.dim()) if a.shape[i] != b.shape[i]})
        axes.append(d)
    return axes


def export_decoder(decoder: Decoder, feature_shape: tuple[int, int], start_id: int) -> tuple[bytes, bytes, dict]:
    """The decoder_encode and decoder_step graphs of ``decoder`` for grids of ``feature_shape`` (P, C), and their
    description."""
    decoder.eval()
    features = torch.randn(2, *feature_shape)
    with torch.no_grad():
        memory = decoder.encode(features)
        state0 = decoder.init_state(memory)
        prev = torch.full((2,), start_id, dtype=torch.long)
        _, state1, _ = decoder.step(prev, state0, memory)
        log_probs, state2, _ = decoder.step(prev, state1, memory)
    state_axes = _growing_axes(state0, state1)
    if _growing_axes(state1, state2) != state_axes:
        raise UnsupportedModelError(f"{decoder.arch_name}: its decoding state changes shape in a way the export cannot "
                         "describe (an axis grows on some steps only)")
    mem_names = [f"memory_{i}" for i in range(len(memory))]
    state_names = [f"state_{i}" for i in range(len(state0))]
    new_names = [f"new_state_{i}" for i in range(len(state0))]
    batch = {0: "batch"}
    enc_axes = {"features": batch, **{n: batch for n in mem_names},
                **{n: ax for n, ax in zip(state_names, state_axes)}}
    name = f"the {decoder.arch_name} decoder"
    encode = to_onnx(DecoderEncodeGraph(decoder), (features,), ["features"], mem_names + state_names, enc_axes, name)
    step_axes = {"prev_tokens": batch, "log_probs": batch, **{n: batch for n in mem_names},
                 **{n: ax for n, ax in zip(state_names, state_axes)}, **{n: ax for n, ax in zip(new_names, state_axes)}}
    # traced on a state that has been through a step (a growing axis is not empty), run from any
    step = to_onnx(DecoderStepGraph(decoder, len(state0)), (prev, *state1, *memory), ["prev_tokens", *state_names,
                   *mem_names], ["log_probs", *new_names], step_axes, name)
    info = {
        "encode": {"inputs": [_tensor_info("features", features, batch)],
                   "outputs": [_tensor_info(n, t, batch) for n, t in zip(mem_names, memory)]
                   + [_tensor_info(n, t, ax) for n, t, ax in zip(state_names, state0, state_axes)]},
        "step": {"inputs": [_tensor_info("prev_tokens", prev, batch)]
                 + [_tensor_info(n, t, ax) for n, t, ax in zip(state_names, state1, state_axes)]
                 + [_tensor_info(n, t, batch) for n, t in zip(mem_names, memory)],
                 "outputs": [_tensor_info("log_probs", log_probs, batch)]
                 + [_tensor_info(n, t, ax) for n, t, ax in zip(new_names, state2, state_axes)]},
        "memory": mem_names, "state": state_names,
    }
    return encode, step, info
