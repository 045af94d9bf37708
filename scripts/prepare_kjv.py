"""Write the King James Bible as training text for the embedded default model.

Source: Debian's ``bible-kjv-text`` package (public domain text; its reader is
the ``bible`` program of ``bible-kjv``):

    apt-get install bible-kjv
    python scripts/prepare_kjv.py            # -> .train-data/kjv-{train,val}.txt

One verse per line, references dropped. Every 50th verse is held out for
validation (2 %); the rest is training text.
"""

import argparse
import subprocess
from pathlib import Path

VAL_EVERY = 50


def kjv_verses() -> list[str]:
    # -f turns pretty-printing off: one "Ref text" line per verse, e.g. "Ge1:1 In the ...".
    out = subprocess.run(
        ["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".train-data"))
    args = parser.parse_args()
    verses = kjv_verses()
    args.out.mkdir(parents=True, exist_ok=True)
    val = [v for i, v in enumerate(verses) if i % VAL_EVERY == 0]
    train = [v for i, v in enumerate(verses) if i % VAL_EVERY != 0]
    (args.out / "kjv-train.txt").write_text("\n".join(train) + "\n")
    (args.out / "kjv-val.txt").write_text("\n".join(val) + "\n")
    print(f"{len(verses)} verses: {len(train)} train, {len(val)} validation -> {args.out}")


if __name__ == "__main__":
    main()
