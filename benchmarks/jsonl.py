"""One JSON line per figure: printed, and appended to --out when given (no dependencies)."""

import json


def emit(result: dict, out=None):
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
