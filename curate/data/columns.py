"""``--columns``: map a dataset's own column names onto the pair fields.

Grammar: comma-separated ``KEY=COLUMN`` items. ``COLUMN`` may be a dotted path
into nested objects (``input.messages``); a top-level column whose name has a
dot wins over the path. Keys:

- ``prompt``, ``chosen``, ``rejected``: the fields of a pair (then the format
  is detected from the renamed record as usual);
- ``system``: a column whose text becomes the prompt's system turn;
- ``a``, ``b``, ``label``, ``label_means``: two replies and the column that
  says which is preferred; ``label_means`` states what the label means and is
  required: ``a-preferred`` (1/true = a), ``b-preferred`` (1/true = b),
  ``index`` (0 = a, 1 = b) or ``sign`` (negative = a, positive = b, 0 = tie);
- ``keep``: a column kept as a typed extra column (repeat ``keep=`` for more).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from curate.data.formats import RowError
from curate.data.formats.labelled import LABEL_MEANINGS
from curate.errors import CurateError

FIELD_KEYS = ("prompt", "chosen", "rejected", "system", "a", "b", "label")
_MISSING = object()


@dataclass
class ColumnMap:
    fields: dict[str, str] = field(default_factory=dict)  # pair field -> source column (path)
    label_means: str | None = None
    keep: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return "a" in self.fields

    def describe(self) -> dict[str, Any] | None:
        if not (self.fields or self.keep):
            return None
        out: dict[str, Any] = dict(self.fields)
        if self.label_means:
            out["label_means"] = self.label_means
        if self.keep:
            out["keep"] = list(self.keep)
        return out


def _usage(problem: str) -> CurateError:
    return CurateError(f"{problem}; use --columns KEY=COL,... with keys {', '.join(FIELD_KEYS)}, label_means, keep "
                       "(e.g. prompt=question,chosen=good,rejected=bad or prompt=q,a=x,b=y,label=l,label_means=index)")


def parse_columns(columns: str | Mapping[str, Any] | None) -> ColumnMap:
    """``"prompt=question,chosen=good"`` (or a dict of the same) -> :class:`ColumnMap`."""
    if not columns:
        return ColumnMap()
    items = list(columns.items()) if isinstance(columns, Mapping) else []
    if not isinstance(columns, Mapping):
        for item in columns.split(","):
            key, sep, value = item.partition("=")
            if not sep or not value.strip():
                raise _usage(f"bad --columns item {item!r}")
            items.append((key.strip(), value.strip()))
    mapping = ColumnMap()
    for key, value in items:
        if key == "keep":
            mapping.keep.extend([value] if isinstance(value, str) else list(value))
        elif key == "label_means":
            if value not in LABEL_MEANINGS:
                raise CurateError(f"label_means={value!r} is not one of {', '.join(LABEL_MEANINGS)}")
            mapping.label_means = value
        elif key in FIELD_KEYS:
            mapping.fields[key] = value
        else:
            raise _usage(f"bad --columns key {key!r}")
    _check(mapping)
    return mapping


def _check(mapping: ColumnMap) -> None:
    fields = mapping.fields
    if mapping.labelled or "label" in fields or "b" in fields:
        missing = [k for k in ("a", "b", "label") if k not in fields]
        if missing:
            raise _usage(f"a label mapping needs a, b and label (missing {', '.join(missing)})")
        if mapping.label_means is None:
            raise CurateError("--columns with label=COL needs label_means=a-preferred|b-preferred|index|sign "
                              "to say which side the label prefers")
        if "chosen" in fields or "rejected" in fields:
            raise _usage("use either chosen/rejected or a/b/label, not both")
    elif mapping.label_means:
        raise _usage("label_means only goes with a=COL,b=COL,label=COL")


def lookup(record: Mapping[str, Any], path: str) -> Any:
    """``record[path]``, or the dotted ``path`` followed through nested objects."""
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def apply_columns(record: Mapping[str, Any], mapping: ColumnMap) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record with mapped fields renamed, and the ``keep`` columns' values."""
    if not mapping.fields and not mapping.keep:
        return dict(record), {}
    wanted = {**mapping.fields, **{f"keep:{c}": c for c in mapping.keep}}
    values = {target: lookup(record, path) for target, path in wanted.items()}
    missing = [wanted[t] for t, v in values.items() if v is _MISSING]
    if missing:
        raise RowError("missing_field", f"mapped column(s) {missing} not in record fields {sorted(record)}")
    out = {k: v for k, v in record.items() if k not in mapping.fields.values()}
    out.update({t: v for t, v in values.items() if not t.startswith("keep:")})
    kept = {t[len("keep:"):]: v for t, v in values.items() if t.startswith("keep:")}
    return out, kept
