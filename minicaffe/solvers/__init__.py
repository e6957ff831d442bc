"""Solvers: train a Net with one of Caffe's six update rules.

    solver = minicaffe.get_solver("lenet_solver.prototxt")   # type from the file
    solver.step(100); solver.solve(); solver.snapshot(); solver.restore("x.solverstate")

`get_solver` picks the class from the solver file's `type` (or the deprecated
`solver_type`); the classes can also be used directly, as in pycaffe.
"""
from .base import (NONE, SNAPSHOT, SOLVER_ACTIONS, STOP, Solver, SolverError, get_solver,
                   load_solver_param, register_solver, solver_registry)
from .lr_policies import LR_POLICIES, learning_rate
from .sgd import NesterovSolver, SGDSolver
from .adaptive import AdaDeltaSolver, AdaGradSolver, AdamSolver, RMSPropSolver

__all__ = ["Solver", "SolverError", "get_solver", "load_solver_param", "register_solver",
           "solver_registry", "learning_rate", "LR_POLICIES", "SGDSolver", "NesterovSolver",
           "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
           "NONE", "STOP", "SNAPSHOT", "SOLVER_ACTIONS"]
