"""The AdamW step of training, at every ZeRO stage (``train.optimizer``, ``train.zero_stage``).

- ``groups.py``: which parameters are decayed;
- ``adamw.py``: the update on flat buffers (one fused kernel on CUDA) and the gradient norm that clips it;
- ``flat_adamw.py``: stage 0, the client optimizer that owns flat fp32 master weights;
- ``zero.py``: stages 1-3, DeepSpeed's ZeRO optimizer with the fused update;
- ``engine.py``: ``deepspeed.initialize`` with either path;
- ``universal.py``: a stage-0 checkpoint in DeepSpeed's universal layout (resume at another stage or world size).
"""
