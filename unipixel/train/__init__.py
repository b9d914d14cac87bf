"""Train and evaluate a small UniPixel on synthetic shape scenes (the offline model in assets/unipixel-shapes).

scenes.py: seeded images and videos of colored shapes with exact masks; conversations.py: the
training conversations in the reference wording; losses.py: LM and SAM 2-style mask losses;
trainer.py: the training loop and checkpoint export; eval.py: `python -m unipixel eval-shapes`.
"""
