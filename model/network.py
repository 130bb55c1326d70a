"""The GRU4Rec network: ``embed`` -> ``hidden_step`` -> ``score_items``, hidden state passed explicitly.

Follows the structure of the official PyTorch implementation (hidasib/GRU4Rec_PyTorch_Official):
constrained embedding (the output matrix ``Wy`` doubles as input embedding), a separate embedding, or
one-hot input through a first GRU layer whose input weights are looked up sparsely. gruflow adds an
event-type embedding (view/click/cart/purchase) to the item input; it starts at zero so click-only
data trains exactly as without it. Optional feature embeddings (category, price bucket, time-gap bucket;
:mod:`model.features`) are summed into the same input; their row 0 ("absent") stays zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.events import N_EVENT_TYPES
from model.features import CATEGORY, GAP, N_GAP_BUCKETS, N_PRICE_BUCKETS, PRICE
from model.params import GRU4RecParams
from model.vocab import Vocabulary


def _dropout(X: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout with ``p`` the DROP probability, drawing from ``generator`` (no global RNG)."""
    if p <= 0.0:
        return X
    keep = 1.0 - p
    mask = torch.empty_like(X).bernoulli_(keep, generator=generator)
    return X * mask.div_(keep)


def _init_uniform(t: torch.Tensor, fan_in: int, fan_out: int, gen: torch.Generator | None) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=gen)


class GRUEmbedding(nn.Module):
    """First GRU layer for one-hot input: input weights are rows looked up by item id."""

    def __init__(self, n_items: int, dim_out: int) -> None:
        super().__init__()
        self.Wx0 = nn.Embedding(n_items, dim_out * 3, sparse=True)
        self.Wrz0 = nn.Parameter(torch.empty(dim_out, dim_out * 2))
        self.Wh0 = nn.Parameter(torch.empty(dim_out, dim_out))
        self.Bh0 = nn.Parameter(torch.zeros(dim_out * 3))

    def forward(self, X: torch.Tensor, H: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_rows(self.Wx0(X), H, extra)

    def forward_rows(self, rows: torch.Tensor, H: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Same as ``forward`` given the already looked-up rows of ``Wx0`` (training gathers them itself)."""
        Vx = rows + self.Bh0
        if extra is not None:
            Vx = Vx + extra
        Vrz = H @ self.Wrz0
        vx_x, vx_r, vx_z = Vx.chunk(3, 1)
        vh_r, vh_z = Vrz.chunk(2, 1)
        r = torch.sigmoid(vx_r + vh_r)
        z = torch.sigmoid(vx_z + vh_z)
        h = torch.tanh((r * H) @ self.Wh0 + vx_x)
        return (1.0 - z) * H + z * h


class GRU4RecNet(nn.Module):
    def __init__(self, n_items: int, params: GRU4RecParams, n_categories: int = 1) -> None:
        """``n_categories`` = rows of the category table (category vocabulary + 1 for "absent")."""
        super().__init__()
        self.n_items = n_items
        # category ids -> rows - 1; grows with the data (see grow_categories); not a parameter
        self.categories = Vocabulary()
        self.params = params
        layers = list(params.layers)
        self.layers = layers
        self.start = 0
        self.constrained = params.constrained_embedding
        self.use_embedding = (not self.constrained) and params.embedding > 0
        if self.constrained:
            n_input = layers[-1]
        elif self.use_embedding:
            self.E = nn.Embedding(n_items, params.embedding, sparse=True)
            n_input = params.embedding
        else:
            self.GE = GRUEmbedding(n_items, layers[0])
            n_input = layers[0] * 3
            self.start = 1
        # event-type embedding, added to the input of the first recurrent step; zero-initialised, and
        # training keeps the commonest type's row fixed, so click-only data trains as without it
        self.T = nn.Embedding(N_EVENT_TYPES, n_input) if params.event_types else None
        # feature embeddings (model.features), summed into the same input as T, zero-initialised
        # or concatenated to it (params.feature_dim > 0)
        self.concat = params.feature_dim > 0
        if self.concat and self.start == 1:
            raise ValueError("feature_dim > 0 needs constrained_embedding or embedding > 0 (a GRUCell first layer)")
        dim = params.feature_dim if self.concat else n_input
        self.C = nn.Embedding(max(1, n_categories), dim) if params.category_feature else None
        self.P = nn.Embedding(N_PRICE_BUCKETS, dim) if params.price_feature else None
        self.D = nn.Embedding(N_GAP_BUCKETS, dim) if params.time_feature else None
        self.n_input = n_input
        if self.concat:
            n_input += dim * len(self.feature_tables())
        self.G = nn.ModuleList()
        for i in range(self.start, len(layers)):
            self.G.append(nn.GRUCell(layers[i - 1] if i > 0 else n_input, layers[i]))
        self.Wy = nn.Embedding(n_items, layers[-1], sparse=True)
        self.By = nn.Embedding(n_items, 1, sparse=True)
        self.reset_parameters()

    @property
    def state_size(self) -> int:
        """Length of one session's flattened hidden state (all layers, concatenated)."""
        return sum(self.layers)

    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(self.params.seed if seed is None else seed)
        for name, p in self.named_parameters():
            if name.startswith(("T.", "C.", "P.", "D.")):
                nn.init.zeros_(p)
            elif name.startswith("By") or ".bias" in name or name.endswith("Bh0"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                if name.startswith("G.") and ("weight_ih" in name or "weight_hh" in name):
                    # GRUCell packs 3 gates: initialise each gate block on its own
                    for block in p.data.chunk(3, 0):
                        _init_uniform(block, block.shape[1], block.shape[0], gen)
                elif name.endswith("Wx0.weight") or name.endswith("Wrz0"):
                    # one-hot GRU input weights pack 3 (or 2) gate blocks side by side
                    for block in p.data.chunk(3 if "Wx0" in name else 2, 1):
                        _init_uniform(block, block.shape[0], block.shape[1], gen)
                else:
                    _init_uniform(p, p.shape[0], p.shape[1], gen)

    def init_hidden(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, h) for h in self.layers]

    def input_table(self) -> nn.Parameter:
        """The parameter whose rows are the per-item inputs (``Wy`` when constrained)."""
        if self.constrained:
            return self.Wy.weight
        if self.use_embedding:
            return self.E.weight
        return self.GE.Wx0.weight

    def feature_tables(self) -> list[tuple[int, nn.Embedding]]:
        """(feature column, embedding) of each feature this network uses (see model.features)."""
        return [(col, emb) for col, emb in ((CATEGORY, self.C), (PRICE, self.P), (GAP, self.D)) if emb is not None]

    @property
    def uses_features(self) -> bool:
        return bool(self.feature_tables())

    def extra_input(self, event_types: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor | None:
        """Sum of the event-type and feature embeddings of B events (None when there is none)."""
        extra = self.T(event_types) if (self.T is not None and event_types is not None) else None
        if features is not None and not self.concat:
            for col, emb in self.feature_tables():
                e = emb(features[:, col])
                extra = e if extra is None else extra + e
        return extra

    @torch.no_grad()
    def grow_categories(self, category_ids) -> int:
        """Append unseen categories to the vocabulary and grow the category table (new rows zero, so a
        grown network scores exactly as before). Returns the number added."""
        if self.C is None:
            return 0
        before = len(self.categories)
        for c in category_ids:
            if c is not None and str(c) != "" and str(c) != "nan":
                self.categories.add(str(c))
        need = len(self.categories) + 1
        if need > self.C.num_embeddings:
            w = self.C.weight
            self.C.weight = nn.Parameter(torch.cat([w.data, torch.zeros(need - w.shape[0], w.shape[1])]))
            self.C.num_embeddings = need
        return len(self.categories) - before

    def embed(self, X: torch.Tensor, H: list[torch.Tensor], event_types: torch.Tensor | None = None,
              features: torch.Tensor | None = None) -> torch.Tensor:
        return self._embed_rows(self.input_table()[X], H, event_types, features)

    def _embed_rows(self, rows: torch.Tensor, H: list[torch.Tensor], event_types: torch.Tensor | None,
                    features: torch.Tensor | None = None) -> torch.Tensor:
        extra = self.extra_input(event_types, features)
        if self.start == 1:
            return self.GE.forward_rows(rows, H[0], extra)
        x = rows + extra if extra is not None else rows
        return self.concat_features(x, features) if self.concat else x

    def concat_features(self, x: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """``x`` followed by the feature embeddings (zero rows when ``features`` is None)."""
        parts = [x]
        for col, emb in self.feature_tables():
            parts.append(emb(features[:, col]) if features is not None else
                         torch.zeros(x.shape[0], emb.embedding_dim))
        return torch.cat(parts, dim=1)

    def hidden_step(self, X: torch.Tensor, H: list[torch.Tensor], training: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Advance every layer one step; ``H`` is updated in place (a list of [B, h] tensors).

        As in the reference, the dropped-out output is what the next step sees as hidden state."""
        for i in range(self.start, len(self.layers)):
            X = self.G[i - self.start](X, H[i])
            if training:
                X = _dropout(X, self.params.dropout_p_hidden, generator)
            H[i] = X
        return X

    def step(self, X: torch.Tensor, H: list[torch.Tensor], event_types: torch.Tensor | None = None,
             training: bool = False, generator: torch.Generator | None = None,
             features: torch.Tensor | None = None) -> torch.Tensor:
        """One event for each of B sessions: returns the top layer's output, H advanced in place.
        ``features``: [B, N_FEATURES] rows (model.features), ignored for features the network lacks."""
        return self.step_rows(self.input_table()[X], H, event_types, training, generator, features)

    def step_rows(self, rows: torch.Tensor, H: list[torch.Tensor], event_types: torch.Tensor | None = None,
                  training: bool = False, generator: torch.Generator | None = None,
                  features: torch.Tensor | None = None) -> torch.Tensor:
        """``step`` given the input rows already looked up (training differentiates w.r.t. them)."""
        E = self._embed_rows(rows, H, event_types, features)
        if training:
            E = _dropout(E, self.params.dropout_p_embed, generator)
        if self.start == 1:
            H[0] = E
            return self.hidden_step(E, H, training, generator) if len(self.layers) > 1 else E
        return self.hidden_step(E, H, training, generator)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters updated densely (all but the per-item tables)."""
        sparse = {id(self.Wy.weight), id(self.By.weight), id(self.input_table())}
        return [p for p in self.parameters() if id(p) not in sparse]

    @torch.no_grad()
    def expand_items(self, n_items: int, seed: int | None = None) -> None:
        """Grow the per-item tables to ``n_items`` rows (new items get fresh random rows, zero bias).

        Existing rows keep their values, so a grown network scores old items exactly as before."""
        old = self.n_items
        if n_items < old:
            raise ValueError(f"cannot shrink the item tables from {old} to {n_items} rows")
        if n_items == old:
            return
        gen = torch.Generator().manual_seed((self.params.seed if seed is None else seed) + n_items)
        tables = [self.Wy, self.By] + ([self.E] if self.use_embedding else []) + ([self.GE.Wx0] if self.start else [])
        for emb in tables:
            w = emb.weight
            new = torch.zeros(n_items - old, w.shape[1])
            if emb is not self.By:
                blocks = 3 if (self.start and emb is self.GE.Wx0) else 1
                for block in new.chunk(blocks, 1):
                    _init_uniform(block, n_items, block.shape[1], gen)
            emb.weight = nn.Parameter(torch.cat([w.data, new]))
            emb.num_embeddings = n_items
        self.n_items = n_items

    def output_weights(self) -> torch.Tensor:
        """The item output matrix (one row per item, ``score = h @ W.T + b``); with a constrained embedding it
        is the input table too. The parameter itself, not a copy."""
        return self.Wy.weight

    @torch.no_grad()
    def copy_item_outputs(self, source: "GRU4RecNet", rows: list[int]) -> None:
        """Give ``rows`` the output weights and biases (``Wy``, ``By``) of ``source``; with a constrained
        embedding that is their input row too. ``rows`` must exist in both networks."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        self.Wy.weight[idx] = source.Wy.weight[idx]
        self.By.weight[idx] = source.By.weight[idx]

    def score_items(self, Xh: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the items ``Y`` (all items when None) for each row of ``Xh``."""
        if Y is None:
            return Xh @ self.Wy.weight.T + self.By.weight.T
        return Xh @ self.Wy(Y).T + self.By(Y).T

    def forward(self, X: torch.Tensor, H: list[torch.Tensor], Y: torch.Tensor | None,
                event_types: torch.Tensor | None = None, training: bool = False,
                features: torch.Tensor | None = None) -> torch.Tensor:
        return self.score_items(self.step(X, H, event_types, training, features=features), Y)
