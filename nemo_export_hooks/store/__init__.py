"""The export directory and nothing else: its names (:mod:`.layout`), file-system helpers
(:mod:`.fs`), the manifest and the one ownership answer (:mod:`.manifest`), staging, the
atomic publish, ``latest`` and retention (:mod:`.commit`), and an HF-format reader
(:mod:`.verify`).

Why a package of its own: these are the rules every writer and reader of an export must
agree on (a staging name, a producer, "is this ours?"), and they were spread over six
files.  Arrows point down: nothing here imports ``exporter/``, ``integrations/``, the
scheduler or the config; callers pass in what they know (the quantized tensor suffixes,
the HF-class check).
"""
