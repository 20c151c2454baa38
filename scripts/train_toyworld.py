"""Train the toy world's base model and attribute classifier (thin CLI over mixofshow.toyworld.train).

    python scripts/train_toyworld.py --device cuda --minutes 3.5     # the real run, ~3.5 min on one H100/H200
    python scripts/train_toyworld.py --smoke --out /tmp/toyworld     # a few steps on CPU: checks the run end to end

Writes a diffusers pipeline folder (default: src/mixofshow/assets/toyworld/) with classifier.safetensors,
training_report.json (steps, seconds per step, losses, held-out scores) and samples.png.
"""

from mixofshow.toyworld.train import main

if __name__ == "__main__":
    main()
