#!/usr/bin/env python3
"""Writes policies/spdx/texts.zip: the license texts of the SPDX License List.

The texts come from the npm package spdx-license-list (CC0-1.0), which packages the SPDX
License List's data (https://spdx.org/licenses/, CC0-1.0). Usage:

    npm pack spdx-license-list@6.12.0 && tar xzf spdx-license-list-6.12.0.tgz
    python3 scripts/spdx-texts.py package/spdx-full.json policies/spdx/texts.zip

then regenerate the anchors the scanner finds texts by:

    CELLA_UPDATE_SPDX=1 cargo test -p cella-scan --test license_texts anchors_are_current

One entry per license, `<identifier>.txt`, deflated on its own (the scanner inflates only the
texts it compares), in identifier order, with a fixed time: the same input gives the same
bytes. The archive's comment says where the data comes from.

A text whose appendix the SPDX templates mark optional (the part after `END OF TERMS AND
CONDITIONS`: Apache-2.0's "How to apply", the GNU licenses' "How to Apply These Terms") is also
written without it, as `<identifier>~terms.txt`: many projects ship the terms alone, and the
scanner reports that variant under the license's own identifier.
"""
import json
import sys
import zipfile

END_OF_TERMS = "END OF TERMS AND CONDITIONS"

PROVENANCE = (
    "SPDX License List: license texts. Data of the SPDX License List (CC0-1.0, "
    "https://spdx.org/licenses/), as packaged in spdx-license-list 6.12.0 (npm; SPDX License "
    "List 3.28.0). One entry per license identifier."
)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: spdx-texts.py SPDX-FULL-JSON OUT.zip")
    with open(sys.argv[1], encoding="utf-8") as f:
        data = json.load(f)
    count = 0
    with zipfile.ZipFile(sys.argv[2], "w") as out:
        out.comment = PROVENANCE.encode()
        for ident in sorted(data):
            text = data[ident].get("licenseText", "")
            if not text.strip():
                continue
            entries = [(ident, text)]
            end = text.find(END_OF_TERMS)
            if end >= 0 and text[end + len(END_OF_TERMS):].strip():
                entries.append((f"{ident}~terms", text[: end + len(END_OF_TERMS)] + "\n"))
            for name, body in entries:
                entry = zipfile.ZipInfo(f"{name}.txt", date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type = zipfile.ZIP_DEFLATED
                entry.external_attr = 0o644 << 16
                out.writestr(entry, body.encode("utf-8"), compresslevel=9)
                count += 1
    print(f"{count} texts written to {sys.argv[2]}", file=sys.stderr)


if __name__ == "__main__":
    main()
