#!/usr/bin/env python3
"""Writes policies/spdx/texts.tsv.gz: the license texts of the SPDX License List.

The texts come from the npm package spdx-license-list (CC0-1.0), which packages the SPDX
License List's data (https://spdx.org/licenses/, CC0-1.0). Usage:

    npm pack spdx-license-list@6.12.0 && tar xzf spdx-license-list-6.12.0.tgz
    python3 scripts/spdx-texts.py package/spdx-full.json policies/spdx/texts.tsv.gz

then regenerate the anchors the scanner finds texts by:

    CELLA_UPDATE_SPDX=1 cargo test -p cella-scan --test license_texts anchors_are_current

The output is one license per line, `identifier<TAB>text`, sorted by identifier, the text with
`\\`, tab, CR and LF escaped as `\\\\`, `\\t`, `\\r` and `\\n`; `#` lines are comments. gzip with
no name and a zero time, so the same input gives the same bytes.
"""
import gzip
import json
import sys


def escape(text):
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: spdx-texts.py SPDX-FULL-JSON OUT.tsv.gz")
    with open(sys.argv[1], encoding="utf-8") as f:
        data = json.load(f)
    lines = [
        "# SPDX License List: license texts. Data of the SPDX License List (CC0-1.0,",
        "# https://spdx.org/licenses/), as packaged in spdx-license-list 6.12.0 (npm; SPDX",
        "# License List 3.28.0). One per line: identifier, text (\\\\ \\t \\r \\n escaped).",
    ]
    for ident in sorted(data):
        text = data[ident].get("licenseText", "")
        if text.strip():
            lines.append(f"{ident}\t{escape(text)}")
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    with open(sys.argv[2], "wb") as out:
        out.write(gzip.compress(raw, compresslevel=9, mtime=0))
    print(f"{len(lines) - 3} texts, {len(raw)} bytes, written to {sys.argv[2]}", file=sys.stderr)


if __name__ == "__main__":
    main()
