"""Show, Attend and Tell (Xu et al., 2015), soft attention, as in system S5.

Notation (per time step t, image regions a_i, i = 1..P, each C-dimensional):

    h_0, c_0   = f_init_h(mean_i a_i), f_init_c(mean_i a_i)           initial state
    e_ti       = w^T tanh(W_a a_i + W_h h_{t-1})                      additive attention
    alpha_t    = softmax_i(e_ti)                                      (B, P)
    beta_t     = sigmoid(f_beta(h_{t-1}))                             gate, (B, C)
    z_t        = beta_t * sum_i alpha_ti a_i                          gated context
    h_t, c_t   = LSTMCell([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
    p(y_t)     = softmax(W_o dropout(h_t))

Loss = cross-entropy on real words + lambda * sum_i (1 - sum_t alpha_ti)^2   ("doubly
stochastic" attention: over the whole caption every region gets about one unit of attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.base import (Decoder, DecoderConfig, DecoderOutput, Memory, State, log_probs,
                                   register_architecture, running_per_step)
from captioner.runtime.devices import autocast_dtype


@dataclass
class SATConfig(DecoderConfig):
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5
    alpha_c: float = 1.0  # lambda of the doubly stochastic regulariser


class Attention(nn.Module):
    """e_ti = w^T tanh(W_a a_i + W_h h); returns the context sum_i alpha_ti a_i and alpha. (The decoder computes
    the same through :meth:`SATDecoder._cell`; this is the layer that holds the weights, and the plain form.)"""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.W_a = nn.Linear(feature_dim, attention_dim)
        self.W_h = nn.Linear(hidden_dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, feats: torch.Tensor, keys: torch.Tensor, h: torch.Tensor):
        # feats (B,P,C), keys = W_a feats (B,P,A) precomputed once per image, h (B,H)
        e = self.w(torch.tanh(keys + self.W_h(h).unsqueeze(1))).squeeze(2)  # (B, P)
        alpha = F.softmax(e, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (B, C)
        return context, alpha


class _Shared(torch.autograd.Function):
    """The identity on a weight (in, out) and its bias that every step multiplies by (:class:`_Product`). Backward
    through time then makes the weight's gradient once, sum_t x_t^T g_t = X^T G as one large matrix product over
    all steps' rows, instead of an (in, out) product and a sum at every step (what cuDNN does for its RNNs)."""

    @staticmethod
    def forward(ctx, weight, bias, sink):
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), bias.view_as(bias)

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        xs, gs = zip(*ctx.sink) if ctx.sink else ((), ())
        ctx.sink.clear()
        if not xs:
            return grad_weight, grad_bias, None
        X, G = torch.cat(xs), torch.cat(gs)
        gw, gb = X.t().to(G.dtype) @ G, G.sum(0)
        return (gw if grad_weight is None else gw + grad_weight), (gb if grad_bias is None else gb + grad_bias), None


class _Product(torch.autograd.Function):
    """x @ weight + bias of one step, for a weight and bias from :class:`_Shared`: the backward gives x its gradient
    and leaves (x, the output's gradient) in the sink, from which :class:`_Shared` makes the weight's."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink):
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        return torch.addmm(bias, x, weight)  # under autocast as the plain product would be

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        ctx.sink.append((x, grad))
        gx = (grad @ weight.t().to(grad.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None, None


@register_architecture("sat", SATConfig)
class SATDecoder(Decoder):
    """The layers are the paper's (and the saved weights' names); the arithmetic is grouped for speed, the same
    sums in another order: every product of h_{t-1} (W_h, f_beta and the LSTM's W_hh) is one matrix product a
    step, the LSTM's input weights are split into the word's part and the context's, tanh in the attention is
    2 sigmoid(2x) - 1 (torch's CPU tanh costs six sigmoids), and in teacher forcing the word's part of every
    step and the output layer of every word run once, outside the loop, and the weights multiplied at every
    step get their gradients in one product over all steps (:class:`_Shared`)."""

    shares_memory = True  # an image's beams attend over its one grid (no copy per beam)

    def __init__(self, cfg: SATConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.attention = Attention(cfg.feature_dim, cfg.hidden_dim, cfg.attention_dim)
        self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.init_c = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.f_beta = nn.Linear(cfg.hidden_dim, cfg.feature_dim)
        self.lstm = nn.LSTMCell(cfg.embed_dim + cfg.feature_dim, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.out.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)
        self._decoding: dict = {}  # dtype -> (the weights' identity and versions, the decoding step's weights)

    # --- the fused weights ---

    def _hidden_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[2 W_h; f_beta; W_hh] transposed, (H, A + C + 4H), and its bias (2 W_h's, f_beta's, the LSTM's two
        summed): h_{t-1} times it gives twice the attention's query, the gate's input and the LSTM's hidden part at
        once. Made at each call, so gradients reach the layers' own weights (decoding keeps a cast copy in
        :meth:`_decoding_weights`)."""
        W_h, f_beta, lstm = self.attention.W_h, self.f_beta, self.lstm
        return (torch.cat([2 * W_h.weight, f_beta.weight, lstm.weight_hh]).t(),
                torch.cat([2 * W_h.bias, f_beta.bias, lstm.bias_ih + lstm.bias_hh]))

    def _cell(self, hidden: torch.Tensor, word_gates: torch.Tensor, feats: torch.Tensor, keys: torch.Tensor,
              c: torch.Tensor, z_product):
        """One step from ``hidden`` = h_{t-1} times :meth:`_hidden_weights` and the word's part of the LSTM's gates:
        (h_t, c_t, alpha_t). ``z_product(z)`` is the context's part of the gates. ``feats`` and ``keys`` have one
        row per image, ``hidden`` k rows per image (its beams, adjacent), k >= 1."""
        n, A, (B, P, C) = hidden.shape[0], keys.shape[2], feats.shape
        w, k = self.attention.w, n // B if B else 1  # k rows (beams) per image share its grid (shares_memory)
        # w^T tanh(u) + b with tanh(u) = 2 sigmoid(2u) - 1: 2 w^T sigmoid(2u) + b - sum(w); 2u = 2 keys + 2 W_h h
        s = torch.sigmoid(torch.add(hidden[:, :A].view(B, k, 1, A), keys.unsqueeze(1), alpha=2))  # (B, k, P, A)
        e = (s @ (2 * w.weight).t()).squeeze(3) + (w.bias - w.weight.sum())  # (B, k, P)
        alpha = F.softmax(e, dim=2)
        context = torch.bmm(alpha, feats).view(n, C)  # each image's k maps against its one grid
        alpha = alpha.view(n, P)
        z = torch.sigmoid(hidden[:, A:A + C]) * context  # gated context
        gates = z_product(z) + (word_gates + hidden[:, A + C:])  # LSTMCell's gate order: i, f, g, o
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c, alpha

    # --- the step interface used by the decoding engine ---

    def encode(self, features: torch.Tensor) -> Memory:
        features = features.float()
        keys = self.attention.W_a(features)  # (B,P,C), (B,P,A)
        dtype = autocast_dtype(features.device.type)
        if dtype is not None and not torch.is_grad_enabled():
            # decoding under autocast: every step's context product would cast the grids again; cast them once
            features = features.to(dtype)
        return features, keys

    def init_state(self, memory: Memory) -> State:
        mean = memory[0].mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def _advance(self, prev_tokens, state, feats, keys):
        h, c = state
        if torch.is_grad_enabled():  # the graph that training differentiates (the cached weights below hold none)
            W, b = self._hidden_weights()
            W_word, W_z = self.lstm.weight_ih.split([self.embed.embedding_dim, feats.shape[2]], dim=1)
            h, c, alpha = self._cell(torch.addmm(b, h, W), self.embed(prev_tokens) @ W_word.t(), feats, keys, c,
                                     lambda z: z @ W_z.t())
            return self.out(self.dropout(h)), (h, c), alpha
        w = self._decoding_weights(feats.device.type)
        h, c, alpha = self._cell(torch.addmm(w["hidden_bias"], h, w["hidden"]), w["words"][prev_tokens], feats, keys,
                                 c, lambda z: z @ w["context"].t())
        return F.linear(self.dropout(h), w["out"], w["out_bias"]), (h, c), alpha

    def _decoding_weights(self, device_type: str) -> dict:
        """The step's weights for decoding (no gradients), cached until a weight changes, in the dtype the step
        computes in (float32, or autocast's bfloat16: cast once, not at every step; one cache per dtype):
        ``hidden`` (H, A + C + 4H) and ``hidden_bias`` as in :meth:`_hidden_weights`; the LSTM's input weights,
        ``context`` (4H, C) and ``word`` (4H, E), contiguous; ``words`` (V, 4H), every word's part of the gates
        (E y W_word^T), so that a step looks its words up instead of multiplying; ``out`` and ``out_bias``. Making
        ``words`` costs one V x E x 4H product per change of the weights: less than the products it replaces in
        any search whose steps have more rows in all than the vocabulary has words (``caption``, validation,
        SCST's sampling of a batch). A view with words appended (a guided search's) starts from the base's cache
        and multiplies only its new words' rows. A weight changed in place through ``.data`` (which no version
        counter sees) needs ``model._decoding.clear()``."""
        dtype = autocast_dtype(device_type) or self.out.weight.dtype
        # the weights it is made from, named (self.parameters() walks the module tree: 25 against 16 us a step);
        # .to() moves data_ptr; an inference tensor (made under inference_mode) keeps no version counter
        W_h, f_beta, lstm, out = self.attention.W_h, self.f_beta, self.lstm, self.out
        key = tuple((id(p), p.data_ptr(), -1 if p.is_inference() else p._version)
                    for p in (self.embed.weight, W_h.weight, W_h.bias, f_beta.weight, f_beta.bias, lstm.weight_ih,
                              lstm.weight_hh, lstm.bias_ih, lstm.bias_hh, out.weight, out.bias))
        cached = self._decoding.get(dtype)
        if cached is not None and cached[0] == key:
            return cached[1]
        E = self.embed.embedding_dim
        base = getattr(self, "_extends", None)  # a view with words appended (models/extension.py, extended_view)
        if isinstance(base, SATDecoder) and base.lstm is lstm and base.attention is self.attention:
            # every weight but the two enlarged layers is the base's: its cache, and the new words' rows only
            weights = dict(base._decoding_weights(device_type))
            old = base.embed.num_embeddings
            weights["words"] = torch.cat([weights["words"], self.embed.weight[old:].to(dtype) @ weights["word"].t()])
        else:
            hidden, hidden_bias = self._hidden_weights()
            weights = {"hidden": hidden.to(dtype), "hidden_bias": hidden_bias.to(dtype),  # .to keeps the layout
                       "context": lstm.weight_ih[:, E:].to(dtype).contiguous(),
                       "word": lstm.weight_ih[:, :E].to(dtype).contiguous()}
            weights["words"] = self.embed.weight.to(dtype) @ weights["word"].t()
        weights.update(out=self.out.weight.to(dtype), out_bias=self.out.bias.to(dtype))
        self._decoding = {**self._decoding, dtype: (key, weights)}  # a new dict: a view made by copy.copy has its own
        return weights

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        logits, state, alpha = self._advance(prev_tokens, state, *memory)
        return log_probs(logits), state, alpha

    # --- teacher forcing ---

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        """Captions must be sorted by decreasing length: step t only runs the captions that
        still have a word to predict (no compute spent on padding)."""
        feats, keys = self.encode(features)
        running = running_per_step(lengths, "SATDecoder")
        B, T = tokens.shape[0], len(running)
        h, c = self.init_state((feats, keys))
        W, b = self._hidden_weights()
        W_word, W_z = self.lstm.weight_ih.split([self.embed.embedding_dim, feats.shape[2]], dim=1)
        word_gates = self.embed(tokens[:, :T]) @ W_word.t()  # (B, T, 4H): every step's word at once
        hidden_product, z_product = self._step_products(W, b, W_z.t())
        hs, alphas = [], []
        for t, n in enumerate(running):
            # finished captions never restart (sorted by length), so the state just shrinks
            h, c, alpha = self._cell(hidden_product(h[:n]), word_gates[:n, t], feats[:n], keys[:n], c[:n], z_product)
            hs.append(h)
            alphas.append(alpha)
        # the words predicted, step by step (time-major): their places in the (T, B) grid
        steps = torch.arange(T, device=lengths.device)
        place = (steps.unsqueeze(1) < (lengths - 1).unsqueeze(0)).nonzero(as_tuple=True)
        words = self.out(self.dropout(torch.cat(hs))) if hs else feats.new_zeros(0, self.cfg.vocab_size)
        logits = words.new_zeros(T, B, words.shape[1]).index_put(place, words).transpose(0, 1)
        att = torch.cat(alphas) if alphas else feats.new_zeros(0, feats.shape[1])
        att = att.new_zeros(T, B, att.shape[1]).index_put(place, att).transpose(0, 1)
        reg = self.cfg.alpha_c * ((1.0 - att.sum(dim=1)) ** 2).mean()
        return DecoderOutput(logits=logits, attention=att, extra_loss=reg)

    @staticmethod
    def _step_products(W: torch.Tensor, b: torch.Tensor, W_z: torch.Tensor):
        """(h -> h W + b, z -> z W_z): with gradients, through :class:`_Shared` and :class:`_Product`."""
        if not (torch.is_grad_enabled() and (W.requires_grad or W_z.requires_grad)):
            return (lambda h: torch.addmm(b, h, W)), (lambda z: z @ W_z)
        hidden_sink, z_sink = [], []
        W, b = _Shared.apply(W, b, hidden_sink)
        W_z, no_bias = _Shared.apply(W_z, W_z.new_zeros(W_z.shape[1]), z_sink)
        return (lambda h: _Product.apply(h, W, b, hidden_sink)), (lambda z: _Product.apply(z, W_z, no_bias, z_sink))
