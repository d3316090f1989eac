"""The edits, module counts and problems of one adapter, as its translation collects them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import IncompatibleAdapterError, ShardmergeError
from ..terms import Replacement, TensorEdit, Term
from .folder import Adapter
from .mismatch import missing, shape_differs


@dataclass
class CollectedEdits:
    """What one adapter does to the base so far; ``add`` stacks a tensor's terms in order."""

    adapter: Adapter
    edits: dict[str, TensorEdit] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    errors: list[ShardmergeError] = field(default_factory=list)
    # Keys that match no base tensor, reported together (so a dropped module is never silent).
    unmatched: list[str] = field(default_factory=list)

    def incompatible(self, msg: str, *, ask: bool = True) -> None:
        """A problem of fit; ``ask=False`` when the adapter's own tensors disagree (no base
        can fit it: asking whether it was made for this base would mislead)."""
        hint = (
            "Is this adapter made for this base model?"
            if ask
            else "Its weights file is inconsistent; re-save the adapter with "
            "PeftModel.save_pretrained()."
        )
        self.errors.append(IncompatibleAdapterError(f"{self.adapter.path}: {msg}", hint=hint))

    def shape_differs(
        self, module: str, base_name: str, want: tuple[int, ...], have: tuple[int, ...]
    ) -> None:
        """``module``'s delta has another shape than its base tensor (summarised per adapter)."""
        self.errors.append(shape_differs(self.adapter.path, module, base_name, want, have))

    def report_unmatched(self) -> None:
        """One problem per key that matched no base tensor (mismatch.summarise folds them)."""
        self.errors.extend(missing(self.adapter.path, name) for name in self.unmatched)

    def add(self, base: str, *, term: Term | None = None, repl: Replacement | None = None) -> None:
        old = self.edits.get(base, TensorEdit())
        self.edits[base] = TensorEdit(
            replacement=repl or old.replacement,
            terms=old.terms + ((term,) if term else ()),
        )
