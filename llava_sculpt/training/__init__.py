"""What `llava-sculpt train` (llava_sculpt/train.py, the entry point with `main`) is made of.

arguments   the flags: LLaVA's (ModelArguments, DataArguments), Hugging Face TrainingArguments + ours, each
            --method's; parsing them (parse_args)
validation  the flags checked against the checkpoint and this machine before anything is loaded
model       the model a run trains: base, frozen, the method's adapters, projector (build_model)
trainer     LlavaSculptTrainer (transformers' Trainer with its hooks overridden) and MethodCallback
run_dir     what a run directory holds besides the weights: run_args.json, method state, training_complete.json
            (the finished-run check, finalise), and which checkpoint a run resumes from

Nothing here imports llava_sculpt.train.
"""
