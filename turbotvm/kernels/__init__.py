"""TurboAttention as TensorIR compute definitions: one prim_func per kernel, no schedule.

Each factory returns an unscheduled ``PrimFunc``; ``turbotvm.schedules`` maps it onto a target.
Shapes are symbolic except head dim and bit width, which fix the tile layout.
"""
