"""Incremental one-event steps equal a full unroll; the hand-written training backward equals autograd."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.train import _Trainer, fit
from model.vocab import Vocabulary


def _net(layers=(8, 6), **kw) -> GRU4RecNet:
    net = GRU4RecNet(20, GRU4RecParams(layers=layers, **kw))
    with torch.no_grad():  # make the event-type embedding matter
        if net.T is not None:
            net.T.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    return net


def _full_unroll(net: GRU4RecNet, items: torch.Tensor, types: torch.Tensor) -> list[torch.Tensor]:
    """Whole sequences at once through torch.nn.GRU with the same weights (an independent code path)."""
    x = net.input_table()[items]  # [B, L, in]
    if net.T is not None:
        x = x + net.T.weight[types]
    finals = []
    for cell in net.G:
        gru = torch.nn.GRU(cell.input_size, cell.hidden_size, batch_first=True)
        gru.load_state_dict({"weight_ih_l0": cell.weight_ih, "weight_hh_l0": cell.weight_hh,
                             "bias_ih_l0": cell.bias_ih, "bias_hh_l0": cell.bias_hh})
        x, h = gru(x)
        finals.append(h[0])
    return finals


@pytest.mark.parametrize("layers", [(8,), (8, 6)])
@pytest.mark.parametrize("constrained", [True, False])
def test_incremental_steps_equal_full_unroll(layers, constrained) -> None:
    kw = {} if constrained else {"constrained_embedding": False, "embedding": 5}
    net = _net(layers, **kw)
    rec = Recommender(net, Vocabulary(str(i) for i in range(20)))
    g = torch.Generator().manual_seed(1)
    items = torch.randint(0, 20, (4, 7), generator=g)
    types = torch.randint(0, 4, (4, 7), generator=g)
    hidden = rec.zero_state(4)
    for t in range(7):
        hidden = rec.step(hidden, items[:, t].numpy(), types[:, t].numpy())
    with torch.no_grad():
        expected = torch.cat(_full_unroll(net, items, types), dim=1).numpy()
    np.testing.assert_allclose(hidden, expected, atol=1e-5)


def test_one_hot_gru_input_mode_steps_consistently() -> None:
    net = GRU4RecNet(20, GRU4RecParams(layers=(8, 6), constrained_embedding=False, embedding=0))
    rec = Recommender(net, Vocabulary(str(i) for i in range(20)))
    items = np.array([[1, 2, 3], [4, 5, 6]])
    types = np.ones_like(items)
    h = rec.zero_state(2)
    for t in range(3):
        h = rec.step(h, items[:, t], types[:, t])
    # row by row gives the same as batched
    h0 = rec.zero_state(1)
    for t in range(3):
        h0 = rec.step(h0, items[:1, t], types[:1, t])
    np.testing.assert_allclose(h[:1], h0, atol=1e-6)
    rows, scores = rec.top_k(h, 5, exclude=[[int(rec.top_k(h, 1)[0][0, 0])], None])
    assert rows.shape == (2, 5) and np.all(np.diff(scores, axis=1) <= 0)


def _data() -> tuple[pd.DataFrame, Vocabulary]:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(40):
        for k in range(int(rng.integers(2, 6))):
            rows.append((s, str(int(rng.integers(0, 20))), s * 100.0 + k, int(rng.integers(0, 4))))
    df = pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time", "EventType"])
    return df, Vocabulary(str(i) for i in range(20))


@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max"])
@pytest.mark.parametrize("momentum", [0.0, 0.3])
def test_hand_written_backward_matches_autograd(loss, momentum) -> None:
    params = GRU4RecParams(layers=(8, 6), batch_size=4, n_sample=6, dropout_p_hidden=0.0, momentum=momentum,
                           loss=loss, bpreg=0.5, elu_param=0.5 if loss == "bpr-max" else 0.0, n_epochs=1)
    df, vocab = _data()
    a, b = _net(**{"layers": (8, 6)}), _net(**{"layers": (8, 6)})
    a.params = b.params = dataclasses.replace(a.params, **{k: getattr(params, k) for k in ("dropout_p_hidden",)})
    original = _Trainer.__init__

    def autograd_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.manual = False

    fit(a, df, params, item_rows=vocab, progress=False, seed=7)
    _Trainer.__init__ = autograd_init
    try:
        fit(b, df, params, item_rows=vocab, progress=False, seed=7)
    finally:
        _Trainer.__init__ = original
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=2e-5), name


def test_merged_repeated_samples_train_exactly_like_repeated_columns() -> None:
    params = GRU4RecParams(layers=(8,), batch_size=4, n_sample=40, dropout_p_hidden=0.0, n_epochs=1, logq=1.0,
                           loss="cross-entropy")  # merging applies to cross-entropy
    df, vocab = _data()
    a, b = _net(layers=(8,)), _net(layers=(8,))
    original = _Trainer.__init__

    def unmerged_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.merge = False

    sa = fit(a, df, params, item_rows=vocab, progress=False, seed=3)
    _Trainer.__init__ = unmerged_init
    try:
        sb = fit(b, df, params, item_rows=vocab, progress=False, seed=3)
    finally:
        _Trainer.__init__ = original
    assert sa["loss"][0] == pytest.approx(sb["loss"][0], rel=1e-5)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=2e-5), name


def test_training_steps_equal_a_plain_autograd_reference_step(monkeypatch) -> None:
    """Whole steps (dropout, shared samples with repeats, logQ, loss / batch_size, Adagrad on every parameter)
    against a straightforward dense autograd version of the reference's maths, with the same samples and masks."""
    import model.gru_backprop as backprop
    from model.adagrad import ADAGRAD_EPS
    from model.negative_sampling import _merge_rows

    n_items, B, n_sample, hidden = 30, 6, 50, 8
    params = GRU4RecParams(layers=(hidden,), batch_size=B, n_sample=n_sample, sample_alpha=0.3, logq=1.0,
                           loss="cross-entropy", bpreg=0.0, elu_param=0.0, dropout_p_hidden=0.25, learning_rate=0.1)
    net = GRU4RecNet(n_items, params)
    counts = np.arange(1, n_items + 1, dtype=np.float64)
    trainer = _Trainer(net, params, counts, counts, torch.Generator().manual_seed(0), expected_steps=10)
    ref = {name: p.detach().clone().requires_grad_() for name, p in net.named_parameters() if not name.startswith("T.")}
    acc = {name: torch.zeros_like(p) for name, p in ref.items()}
    rs = np.random.RandomState(4)
    masks: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(backprop, "_mask", lambda x, p, gen: masks["h"] if p > 0 else None)
    H, H_ref = [torch.zeros(B, hidden)], torch.zeros(B, hidden)
    for _ in range(6):
        X, Y, S = (torch.from_numpy(rs.randint(0, n_items, n)) for n in (B, B, n_sample))
        masks["h"] = torch.from_numpy((rs.rand(B, hidden) > 0.25).astype(np.float32) / 0.75)
        uniq, logc = _merge_rows(S[None])
        trainer.sampler.next_merged = lambda u=uniq[0], c=logc[0]: (u, c)
        loss = trainer.step(X, torch.ones(B, dtype=torch.int64), Y, H)
        # reference: repeated sample columns kept, targets corrected by log(count), samples by alpha*log(count)
        Wy, By = ref["Wy.weight"], ref["By.weight"]
        h = torch.gru_cell(Wy[X], H_ref, ref["G.0.weight_ih"], ref["G.0.weight_hh"],
                           ref["G.0.bias_ih"], ref["G.0.bias_hh"]) * masks["h"]
        cols = torch.cat([Y, S])
        logq = torch.cat([torch.log(torch.from_numpy(counts)[Y]), 0.3 * torch.log(torch.from_numpy(counts)[S])]).float()
        scores = h @ Wy[cols].T + By[cols].T - logq
        L = -torch.log(torch.softmax(scores, 1).diagonal() + 1e-24).sum() / B
        grads = torch.autograd.grad(L, list(ref.values()), allow_unused=True)
        with torch.no_grad():
            for (name, p), g in zip(ref.items(), grads):
                if g is not None:
                    acc[name] += g * g
                    p -= params.learning_rate * g / torch.sqrt(acc[name] + ADAGRAD_EPS)
        H_ref = h.detach()
        assert loss == pytest.approx(float(L.detach()), rel=1e-5)
        assert torch.allclose(H[0], H_ref, atol=1e-5)
    for name, p in ref.items():
        assert torch.allclose(dict(net.named_parameters())[name], p, atol=1e-5), name
