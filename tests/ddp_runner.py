"""Run `llava_sculpt.train.main` and record, per process, what the test needs to compare runs.

    torchrun --nproc_per_node 2 tests/ddp_runner.py SPEC.json      # every process of a data-parallel launch
    instrumented_run(argv, dump_dir)                                  # in-process, one process

SPEC.json is a list of {"argv": [...training flags...], "dump": dir}; the runs are trained one after another in
the same processes (one interpreter start for all of them).  Per run and process, `dump` receives
`rank{R}.safetensors` (every trainable parameter as this process holds it at the end, and the method state under
`method/`) and `rank{R}_ids.json` (the dataset indices this process drew, in order).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def _recording(dump_dir: Path):
    import llava_sculpt.train as train
    from llava_sculpt.data.dataset import LlavaSupervisedDataset

    ids: list[int] = []
    get_item, finalise = LlavaSupervisedDataset.__getitem__, train.finalise

    def recording_get_item(self, i):
        ids.append(int(i))
        return get_item(self, i)

    def recording_finalise(trainer, run, method, output_dir):
        finalise(trainer, run, method, output_dir)
        from safetensors.torch import save_file

        rank = trainer.args.process_index
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters()
                   if p.requires_grad}
        tensors.update({f"method/{k}": v.detach().cpu().contiguous() for k, v in method.state_dict().items()})
        dump_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(dump_dir / f"rank{rank}.safetensors"))
        (dump_dir / f"rank{rank}_ids.json").write_text(json.dumps(ids))

    LlavaSupervisedDataset.__getitem__, train.finalise = recording_get_item, recording_finalise
    try:
        yield
    finally:
        LlavaSupervisedDataset.__getitem__, train.finalise = get_item, finalise


def instrumented_run(argv: list[str], dump_dir) -> int:
    from llava_sculpt.train import main

    with _recording(Path(dump_dir)):
        return main(argv)


if __name__ == "__main__":
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        if instrumented_run(spec["argv"], spec["dump"]) != 0:
            sys.exit(f"rank {os.environ.get('RANK')}: training failed: {spec['argv']}")
