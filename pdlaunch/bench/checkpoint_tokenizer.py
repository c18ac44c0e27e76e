"""The tokenizer of a `pdlaunch bench make-checkpoint` checkpoint: the demo model's byte-level BPE padded to the
full vocabulary, so every id a random model samples decodes (the text is noise)."""

from __future__ import annotations

import json
from pathlib import Path

from pdlaunch.errors import PdlaunchError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what write_tokenizer writes


def write_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int) -> None:
    """The demo tokenizer's files (pdlaunch.model.demo_tokenizer), its vocabulary padded to
    `vocab_size` with filler tokens `<tN>` that decode to themselves.

    Ids below the demo's 512 keep their meaning (bytes, merges, specials, chat template), so text
    encodes as it does for the demo model, and every id a random 128256-way model samples decodes.
    The fillers go into the BPE vocabulary (never produced by encoding: no merge makes them), and the
    specials are listed there too so that they keep their ids."""
    from tokenizers import Tokenizer

    from pdlaunch.model.demo_tokenizer import VOCAB_SIZE, build_demo_tokenizer, write_tokenizer_files

    if vocab_size < VOCAB_SIZE:
        raise PdlaunchError(f"must be at least {VOCAB_SIZE} (the demo tokenizer's ids)", field="vocab_size")
    write_tokenizer_files(out_dir)  # tokenizer_config.json (chat template, bos/eos), tokenizer.json
    spec = json.loads(build_demo_tokenizer().to_str())
    vocab = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    vocab.update({f"<t{i}>": i for i in range(VOCAB_SIZE, vocab_size)})
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    if tokenizer.get_vocab_size() != vocab_size:
        raise PdlaunchError(f"tokenizer came out with {tokenizer.get_vocab_size()} ids, not {vocab_size}",
                            field="vocab_size")
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = model_max_length
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
