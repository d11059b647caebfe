"""The three stage processes (encode, denoise, decode); their shared contract is listed in stages/contract.py."""

from stages.lifeline import bind_to_parent as _bind_to_parent

_bind_to_parent()  # a stage started by `orchestrate` dies with it (stages/lifeline.py)
