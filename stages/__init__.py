"""The three stage processes (encode, denoise, decode); see stages/contract.py."""

from stages.lifeline import bind_to_parent as _bind_to_parent

_bind_to_parent()  # a stage started by `orchestrate` dies with it (stages/lifeline.py)
