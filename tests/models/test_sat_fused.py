"""The SAT decoder's grouped arithmetic (models/sat.py): the gradients of teacher forcing, whose per-step weights
get theirs in one product over all steps, equal those of the plain step-by-step graph; the fused weights that
decoding caches follow every change of the weights."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .test_sat import V, batch, make


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _stepped_loss(model, feats, tokens, lengths) -> torch.Tensor:
    """The teacher-forced loss through ``step`` (plain autograd at every step), as ``forward`` + cross-entropy."""
    memory = model.encode(feats)
    state = model.init_state(memory)
    T = int(lengths.max()) - 1
    logps, alphas, targets = [], [], []
    for t in range(T):
        logp, state, alpha = model.step(tokens[:, t], state, memory)
        live = (lengths - 1) > t
        logps.append(logp[live])
        targets.append(tokens[live, t + 1])
        alphas.append(alpha * live.unsqueeze(1))
    reg = model.cfg.alpha_c * ((1.0 - torch.stack(alphas, 1).sum(1)) ** 2).mean()
    return F.nll_loss(torch.cat(logps), torch.cat(targets)) + reg


def test_teacher_forcing_gradients_equal_the_step_by_step_graph():
    model = make(8, dropout=0.0).train()
    feats, tokens, lengths = batch(8, word_counts=(7, 5, 5, 3, 1, 0))
    out = model(feats, tokens, lengths)
    T = out.logits.shape[1]
    mask = torch.arange(T).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    forced = F.cross_entropy(out.logits[mask], tokens[:, 1:T + 1][mask]) + out.extra_loss
    stepped = _stepped_loss(model, feats, tokens, lengths)
    torch.testing.assert_close(forced, stepped, rtol=1e-5, atol=1e-6)
    a, b = _grads(model, forced), _grads(model, stepped)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    assert float(a["lstm.weight_hh"].abs().sum()) > 0 and float(a["attention.W_h.weight"].abs().sum()) > 0


def test_decoding_follows_weights_changed_in_place():
    model = make(9).eval()
    feats, tokens, _ = batch(9)
    with torch.inference_mode():
        memory = model.encode(feats)
        state = model.init_state(memory)
        before = model.step(tokens[:, 0], state, memory)[0]  # fills the cache of fused weights
    with torch.no_grad():  # as an optimizer step or load_state_dict changes them
        model.f_beta.weight.mul_(-3.0)
        model.lstm.bias_hh.add_(0.5)
    fresh = copy.deepcopy(model)
    fresh._decoding = {}
    with torch.inference_mode():
        after = model.step(tokens[:, 0], state, memory)[0]
        expected = fresh.step(tokens[:, 0], state, memory)[0]
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(before, after, atol=1e-4)
    assert after.shape == (tokens.shape[0], V)


def _steps(model, tokens, state, memory, n: int):
    """The log-probabilities of ``n`` steps fed ``tokens``' words."""
    out = []
    for t in range(n):
        logp, state, _ = model.step(tokens[:, t], state, memory)
        out.append(logp)
    return torch.stack(out, 1)


def test_decoding_weights_give_the_steps_of_the_trained_graph():
    """Decoding (no gradients) runs on weights cast and laid out once per dtype, looks each word's part of the gates
    up in a table, and (under autocast) takes grids cast once by ``encode``: its steps equal the graph that training
    differentiates, in float32 and under bfloat16 autocast."""
    model = make(9).eval()
    feats, tokens, _ = batch(9)
    n = tokens.shape[1] - 1
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            memory = model.encode(feats)
            state = model.init_state(memory)
            graph = _steps(model, tokens, state, memory, n).detach()  # gradients on: the trained graph
            with torch.inference_mode():
                fast_memory = model.encode(feats)
                fast_state = model.init_state(fast_memory)
                cached = _steps(model, tokens, fast_state, fast_memory, n)
                again = _steps(model, tokens, fast_state, fast_memory, n)
        dtype = torch.bfloat16 if autocast else torch.float32
        assert fast_memory[0].dtype == dtype and memory[0].dtype == torch.float32  # cast once, for decoding only
        w = model._decoding[dtype][1]
        assert w["context"].dtype == w["words"].dtype == dtype
        assert w["words"].shape == (V, 4 * model.cfg.hidden_dim)
        tol = dict(rtol=0, atol=0.05) if autocast else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.float(), graph.float(), **tol)
        assert torch.equal(again, cached)  # the cache gives the same steps every time
    assert set(model._decoding) == {torch.float32, torch.bfloat16}  # one cache per dtype: switching rebuilds none


def test_a_frozen_decoder_under_gradients_takes_the_graph_path():
    """With gradients on (a frozen decoder whose inputs need them, as when only an encoder trains), the step is the
    differentiable graph, never the cached inference weights."""
    model = make(9).eval().requires_grad_(False)
    feats, tokens, _ = batch(9)
    feats = feats.clone().requires_grad_(True)
    with torch.inference_mode():
        model.step(tokens[:, 0], model.init_state(model.encode(feats.detach())), model.encode(feats.detach()))
    memory = model.encode(feats)
    logp, _, _ = model.step(tokens[:, 0], model.init_state(memory), memory)
    logp.sum().backward()
    assert feats.grad is not None and float(feats.grad.abs().sum()) > 0


def test_decoding_without_gradients_keeps_dropout_in_training_mode():
    model = make(9, dropout=0.5).train()
    feats, tokens, _ = batch(9)
    with torch.no_grad():
        memory = model.encode(feats)
        state = model.init_state(memory)
        torch.manual_seed(0)
        a = model.step(tokens[:, 0], state, memory)[0]
        torch.manual_seed(1)
        b = model.step(tokens[:, 0], state, memory)[0]
        model.eval()
        c = model.step(tokens[:, 0], state, memory)[0]
        d = model.step(tokens[:, 0], state, memory)[0]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, d)


def test_a_view_with_words_appended_builds_on_the_bases_decoding_cache():
    """A guided search's view (extended_view) takes the base's cached weights and multiplies only its new words'
    rows; its steps equal those of the same view with its cache built from nothing."""
    from captioner.models.extension import VocabExtension, extended_view

    model = make(9).eval()
    E, H = model.cfg.embed_dim, model.cfg.hidden_dim
    torch.manual_seed(1)
    ext = VocabExtension(["giraffe", "kitten", "zebra"], torch.randn(3, E), torch.randn(3, H), torch.randn(3))
    feats, tokens, _ = batch(9)
    prev = tokens[:, 0].clone()
    prev[0] = V + 1  # a word of the extension
    with torch.inference_mode():
        memory = model.encode(feats)
        state = model.init_state(memory)
        model.step(tokens[:, 0], state, memory)  # the base's cache
        base_words = model._decoding[torch.float32][1]["words"]
        view = extended_view(model, ext, torch.tensor([2, 0]))
        fast = view.step(prev, state, memory)[0]
        words = view._decoding[torch.float32][1]["words"]
        assert words.shape == (V + 2, 4 * H) and torch.equal(words[:V], base_words)
        assert len(list(view.parameters())) == len(list(model.parameters()))  # the base is no submodule
        plain = extended_view(model, ext, torch.tensor([2, 0]))
        object.__setattr__(plain, "_extends", None)  # its own cache, from all its rows
        torch.testing.assert_close(fast, plain.step(prev, state, memory)[0], rtol=1e-5, atol=1e-5)
        assert fast.shape == (len(prev), V + 2)
