"""Reading XLA's HLO text (what `compiled.as_text()` prints): shared by the benchmarks that look at
what XLA made of a train step."""

import re


def computations(text):
    """{computation name: [instruction lines]} of an HLO module's text."""
    out, name = {}, None
    for line in text.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            name = head.group(1)
            out[name] = []
        elif name and line.strip() == "}":
            name = None
        elif name:
            out[name].append(line)
    return out


def op_of(line):
    m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][\w\-]*)\(", line)
    return m.group(1) if m else None


def first_match(text: str, table, default: str) -> str:
    """The label of the first (label, regex) in `table` that matches `text`, else `default`."""
    return next((label for label, pattern in table if re.search(pattern, text)), default)
