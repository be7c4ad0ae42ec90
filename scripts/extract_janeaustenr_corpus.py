"""Rebuild calibration/corpus/*.txt from Debian's r-cran-janeaustenr package (run once, by hand).

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb pkg
    pip install rdata && python scripts/extract_janeaustenr_corpus.py pkg calibration/corpus

The package stores each novel as an R character vector (one element a line) in a lazy-load database:
`Rdata.rdx` (gzip, index of offsets) and `Rdata.rdb` (4-byte length + zlib blob per object).
"""

import gzip
import sys
import zlib
from pathlib import Path

import rdata

NOVELS = {"sensesensibility": "sense_and_sensibility.txt", "persuasion": "persuasion.txt"}


def main(pkg_root: str, out_dir: str) -> None:
    base = Path(pkg_root) / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
    blob = base.with_suffix(".rdb").read_bytes()
    for name, (offset, length) in index["variables"].items():
        if str(name) not in NOVELS:
            continue
        raw = blob[int(offset): int(offset) + int(length)]
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(raw[4:])))
        text = "\n".join(str(line) for line in lines).strip() + "\n"
        Path(out_dir, NOVELS[str(name)]).write_text(text)
        print(f"{NOVELS[str(name)]}: {len(text)} characters")


if __name__ == "__main__":
    main(*sys.argv[1:3])
