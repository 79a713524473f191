"""The experiments of technical_report.md that drive entry points over variants and seeds."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch


def in_parallel(fn, calls: list[tuple], jobs: int) -> list:
    """[fn(*call) for call in calls]: in this process with jobs 1, else `jobs` at a time in worker processes of one
    thread each."""
    if jobs == 1:
        return [fn(*call) for call in calls]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return [future.result() for future in [pool.submit(fn, *call) for call in calls]]
