"""mlsched-load's entry point: the loader becomes a real-time thread before anything is imported.

Under load, the interpreter's imports (numpy, the loader) queue behind every CPU hog and the
attach waits for them; loader.main drops SCHED_FIFO once the scheduler is attached. Only the
standard library's os is imported here.
"""

import os


def main() -> int:
    if os.geteuid() == 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            pass  # only the start-up gets slower
    from loader.main import main as loader_main
    return loader_main()


if __name__ == "__main__":
    raise SystemExit(main())
