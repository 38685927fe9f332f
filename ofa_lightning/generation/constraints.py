"""Constraints on the next token: a prefix trie, an allowed id range, n-gram blocking.

All three act on a whole batch of hypotheses at once with tensor ops; nothing loops over the
vocabulary or over hypotheses.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ofa_lightning.generation.config import EOS, NUM_SPECIALS

NEG_INF = float("-inf")


class Trie:
    """Prefix tree over candidate answers (VQA answers, yes/no/maybe, class names).

    Each candidate is stored followed by eos, so eos is allowed exactly where a candidate
    ends. A hypothesis is tracked by its node id: 0 is the root (nothing generated after bos),
    -1 means "left the trie", where, as in the official ``Trie.get_next_layer``, only eos is
    allowed. Lookups are vectorised: a sorted edge table answers "child of (node, token)" with
    ``searchsorted``, and a CSR table lists each node's children.
    """

    def __init__(self, sequences: Iterable[Sequence[int]], eos: int = EOS) -> None:
        self.eos = eos
        children: list[dict[int, int]] = [{}]
        for sequence in sequences:
            node = 0
            for token in [int(t) for t in sequence] + [eos]:
                if token < 0:
                    raise ValueError(f"Trie: token ids must be >= 0, got {token} in {sequence}")
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = children[node][token] = len(children)
                    children.append({})
                node = nxt
        if len(children) == 1:
            raise ValueError("Trie needs at least one candidate sequence")
        self._children = children
        edges = sorted((node, token, child) for node, kids in enumerate(children)
                       for token, child in kids.items())
        self.stride = 1 + max((token for _, token, _ in edges), default=eos)
        edge_node = torch.tensor([e[0] for e in edges], dtype=torch.long)
        edge_token = torch.tensor([e[1] for e in edges], dtype=torch.long)
        counts = torch.bincount(edge_node, minlength=len(children))
        self._tables = {
            "edge_key": edge_node * self.stride + edge_token,  # sorted (node, token) keys
            "edge_child": torch.tensor([e[2] for e in edges], dtype=torch.long),
            "edge_token": edge_token,  # CSR values: children of node n at offsets[n]:offsets[n+1]
            "offsets": torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        }
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def num_nodes(self) -> int:
        return len(self._children)

    @property
    def max_token(self) -> int:
        return self.stride - 1

    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Allowed continuations of ``prefix`` (tokens after bos); off the trie: [eos]."""
        node = 0
        for token in prefix:
            node = self._children[node].get(int(token), -1)
            if node < 0:
                return [self.eos]
        return sorted(self._children[node])

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = {k: v.to(device) for k, v in self._tables.items()}
        return self._device_tables[device]

    def advance(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Node after appending ``tokens`` (n,) to the hypotheses at ``nodes`` (n,); -1 = off."""
        t = self._on(nodes.device)
        keys = nodes * self.stride + tokens  # (n,)
        pos = torch.searchsorted(t["edge_key"], keys).clamp_(max=t["edge_key"].numel() - 1)
        found = (t["edge_key"][pos] == keys) & (nodes >= 0) & (tokens >= 0) & (tokens < self.stride)
        return torch.where(found, t["edge_child"][pos], torch.full_like(nodes, -1))

    def walk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Nodes (n, L + 1) visited by token rows (n, L): column i is the node after i tokens."""
        nodes = [torch.zeros(tokens.size(0), dtype=torch.long, device=tokens.device)]
        for i in range(tokens.size(1)):
            nodes.append(self.advance(nodes[-1], tokens[:, i]))
        return torch.stack(nodes, dim=1)

    def allowed_mask(self, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(n, V) bool: True where the token may follow the hypothesis at that node."""
        if self.max_token >= vocab_size:
            raise ValueError(f"Trie holds token id {self.max_token}, outside a vocabulary of "
                             f"{vocab_size}")
        t = self._on(nodes.device)
        flat = nodes.reshape(-1)
        inside = flat >= 0
        safe = flat.clamp(min=0)
        start = t["offsets"][safe]  # (n,)
        count = torch.where(inside, t["offsets"][safe + 1] - start, torch.zeros_like(start))
        rows = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), count)
        first = (count.cumsum(0) - count)[rows]  # position of each row's first child in `rows`
        within = torch.arange(rows.numel(), device=flat.device) - first
        mask = torch.zeros(flat.numel(), vocab_size, dtype=torch.bool, device=flat.device)
        mask[rows, t["edge_token"][start[rows] + within]] = True
        mask[~inside, self.eos] = True
        return mask.view(*nodes.shape, vocab_size)


def apply_constraint_range(logits: torch.Tensor, lo: int, hi: int) -> None:
    """In place: only ids 0-3 and [lo, hi) stay possible (the official ``constraint_range``)."""
    logits[..., NUM_SPECIALS:lo] = NEG_INF
    logits[..., hi:] = NEG_INF


def block_repeated_ngrams(lprobs: torch.Tensor, seq: torch.Tensor, size: int, pad: int) -> None:
    """In place: ban every token that would complete an n-gram already present in ``seq``.

    ``lprobs`` (n, V); ``seq`` (n, L) is each hypothesis so far, bos included, as the official
    ``NGramRepeatBlock`` sees it. The last ``size - 1`` tokens are compared with the prefix of
    every earlier n-gram window at once. Windows that do not match write their -inf to column
    ``pad`` instead (never a valid output, already banned by the search), so the cost is
    O(n * L), not O(n * V).
    """
    length = seq.size(1)
    if size <= 0 or length < size:
        return
    windows = seq.unfold(1, size, 1)  # (n, W, size)
    context = seq[:, length - size + 1:]  # (n, size - 1)
    hit = (windows[..., :-1] == context.unsqueeze(1)).all(-1)  # (n, W)
    banned = torch.where(hit, windows[..., -1], torch.full_like(windows[..., -1], pad))
    lprobs.scatter_(1, banned, NEG_INF)
