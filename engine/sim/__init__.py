"""The simulated executor: the real scheduler, policies, block manager and telemetry over a cost model
of iteration time calibrated on a GPU (`batchdeck calibrate`), so H200-scale scheduling runs on any CPU.

profile.py (what a calibration measured), cost_model.py (iteration shape -> seconds), clock.py
(virtual and paced time), executor.py (stands where the model runner stands), engine.py (the engine
built on them), calibrate.py (the designed grid of shapes and the fit).
"""
