"""Train the toy world's sketch T2I-Adapter against its base model (thin CLI over mixofshow.toyworld.sketch).

    python scripts/train_toy_sketch_adapter.py                  # into the bundled model: about 10 min on 2 CPU cores
    python scripts/train_toy_sketch_adapter.py --base DIR       # into a folder written by scripts/train_toyworld.py

Writes DIR/sketch_adapter/ (diffusers T2IAdapter, fp16 weights, training_report.json with the held-out loss of the
base model without and with the adapter).
"""

from mixofshow.toyworld.sketch import main

if __name__ == "__main__":
    main()
