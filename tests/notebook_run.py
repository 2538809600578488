"""Run by test_interrupt.py in a process of its own, as a notebook or script calls the API: the
tiny recipe on a small archive, 3 epochs, called until it finishes. Each call prints `CALL n`;
an interrupted call prints its one line (rj.Interrupted) or `KeyboardInterrupt`, then whether
the SIGINT handler the process had is back.

    python notebook_run.py WORKDIR ARCHIVE
"""

import signal
import sys

import resnet_jax as rj

workdir, archive = sys.argv[1], sys.argv[2]
dataset = rj.load_dataset(data_dir=archive)
# TINY's recipe (tests/conftest.py), one step a device call so that a stop lands mid-epoch
config = rj.presets.tiny(batch_size=16, epochs=3, steps_per_call=1)
before = signal.getsignal(signal.SIGINT)
for call in range(1, 6):
    print(f"CALL {call}", flush=True)
    try:
        rj.train_and_evaluate(config, workdir, dataset)
        print("FINISHED", flush=True)
        break
    except rj.Interrupted as e:
        print(f"Interrupted: {e}", flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    finally:
        print(f"handler restored: {signal.getsignal(signal.SIGINT) is before}", flush=True)
