"""llm_pipeline: the parts of one Qwen model on several processes or hosts, as a micro-batched pipeline.

Run every rank with ``torchrun --nproc-per-node N script.py`` (``--nnodes`` across hosts)::

    from llm_pipeline import Pipeline, generate, load_stage
    stage = load_stage("qwen-sep", "auto")          # each rank loads its part: 'b 0-12' / '12-24 e'
    if stage.rank == 0:
        with Pipeline(stage, micro_batches=4) as pipe:
            new = generate(pipe, prompt_ids, 32, temperature=0.7)   # sampled on rank 0 by llm_sampler
    else:
        stage.serve()                               # until rank 0's pipeline closes
    stage.close()
"""

from .comm import PipelineError, StageError
from .generate import generate, generate_stream
from .pipeline import Pipeline
from .spec import check_stages, parse_stages, split_bytes, split_layers, stage_specs
from .stage import Stage, load_stage, pin_local_cpus

__version__ = "0.3.0"

__all__ = [
    "Pipeline",
    "PipelineError",
    "Stage",
    "StageError",
    "check_stages",
    "generate",
    "generate_stream",
    "load_stage",
    "parse_stages",
    "pin_local_cpus",
    "split_bytes",
    "split_layers",
    "stage_specs",
]
