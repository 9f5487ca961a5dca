"""`clara inspect --checkpoint=DIR --index=IDX --doc=ID` (or `--bundle=BUNDLE --doc=ID`):
decodes a document's stored latents back to text with the stage-1 paraphrase instruction and
lists the nearest documents of those latents. Prints one JSON object per --doc: id, decoded,
stored (the audit record), neighbors [{id, score}].
"""

from __future__ import annotations

import json

from absl import flags

from clara_jax.commands.rag_common import (
    InputError,
    build_pipeline,
    define_pipeline_flags,
    exit_on_bad_input,
)

define_pipeline_flags()
flags.DEFINE_multi_string("doc", None, "Document id to inspect (repeatable); a chunked "
                          "document's plain id inspects each of its chunks ID#k.")
flags.DEFINE_integer("max_new_tokens", None,
                     "Length cap of the decoded text (default config.data.doc_max_len).")
flags.DEFINE_integer("neighbors", 5, "How many nearest documents to list.")


def main(argv) -> None:
    del argv

    fl = flags.FLAGS
    with exit_on_bad_input("inspect"):
        if not fl.doc:
            raise InputError("--doc=ID is required")
        pipeline = build_pipeline(fl, True, no_index_hint="")
        # A chunked document's plain id inspects each of its chunks.
        outs = [pipeline.inspect_document(d, fl.max_new_tokens, fl.neighbors)
                for d in pipeline.index.resolve(fl.doc)]
    for out in outs:
        print(json.dumps(out, ensure_ascii=False))
