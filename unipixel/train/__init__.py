"""Train and evaluate a small UniPixel on synthetic shape scenes (the offline model in assets/unipixel-shapes).

Data: scenes.py (seeded images and videos of colored shapes with exact masks), conversations.py
(the training conversations in the reference wording), data.py (how every stage draws them).
The model: shapes_model.py (built from scratch), stages.py (surgery that starts a stage), fits.py
(heads fitted on fixed states), ref_route.py and identity_read.py (links built by hand).
Steps: steps.py (one step's losses), losses.py, sam_prompts.py, keep_segs.py, own_masks.py.
Stages: trainer.py (the language stage, `python -m unipixel.train.trainer`), sam_stage.py,
vision_stage.py, checkpoints.py, parallel.py, stage_log.py.
Evaluation: eval.py (`python -m unipixel.train.eval`).
"""
