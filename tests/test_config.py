"""Bad configurations fail at once with one clear line; the experiment recipes compose as promised.

In-process: `compose()` raises `ConfigError` (one line naming the key) before anything is written.
As the CLI: `allconv-hpc train <bad override>` exits 2 with a single `allconv-hpc: error:` line on
stderr, no traceback, quickly, and without creating the run folder.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path
import shutil

import pytest
import torch

from allconv_hpc.compose import compose
from allconv_hpc.config import MODEL_NAMES, SECTIONS, ConfigError
from allconv_hpc.data import DataError, check_present
from proc import clean_env

# (overrides, substrings the one-line message must contain)
BAD = [
    (["model=nope"], ["model/nope"]),
    # Hydra would merge the two into one config under model_a's name: neither net
    (["model=[allcnn_c,model_a]"], ["model=[allcnn_c,model_a] picks 2 model options at once", "give one, model=model_a",
                                    "submit -m model=allcnn_c,model_a"]),
    (["+schedule=[paper,cosine]"], ["picks 2 schedule options"]),
    (["model=[]"], ["model=[] picks no model option"]),
    # an ${...} that does not resolve: OmegaConf names the key only, not the override, nor what it takes
    (["wandb.name=a${model.nam}"], ["bad override 'wandb.name=a${model.nam}': Interpolation key 'model.nam' not found",
                                    "names another key of the config"]),
    (["optim.lr=${oc.env:ALLCONV_UNSET_VAR}"], ["bad override 'optim.lr=${oc.env:ALLCONV_UNSET_VAR}': environment "
                                                 "variable ALLCONV_UNSET_VAR is not set",
                                                 "give a default: ${oc.env:ALLCONV_UNSET_VAR,DEFAULT}"]),
    (["schedule.milestones.x=1"], ["schedule.milestones.x=1", "takes an index, key.0=value"]),  # OmegaConf's ValueError
    (["model.name=nope"], ["model.name='nope'", "allcnn_c", "allcnn_seed"]),
    (["optim.lr=0"], ["optim.lr=0", "> 0"]),
    (["optim.lr=-1"], ["optim.lr=-1", "> 0"]),
    (["dist.timeout_s=1e10"], ["dist.timeout_s=1e+10 must be >= 1 and at most 604800 (7 days)"]),  # gloo failed at once, 1e30 overflowed
    (["dist.timeout_s=0.0001"], ["dist.timeout_s=0.0001 must be >= 1"]),  # gloo gave up at 0 ms, with a C++ stack
    (["trainer.epochs=0"], ["trainer.epochs=0", ">= 1"]),
    (["trainer.batch_size=0"], ["trainer.batch_size=0", ">= 1"]),
    (["trainer.batch_size=-4"], ["trainer.batch_size=-4"]),
    (["model.width=0.001"], ["model.width=0.001", "empty"]),
    (["trainer.precision=bf16", "trainer.device=cpu"], ["trainer.precision=bf16", "trainer.precision=fp32"]),
    (["trainer.precision=fp16", "trainer.device=cpu"], ["trainer.precision=fp16", "trainer.precision=fp32"]),
    (["trainer.compile_mode=reduce-overhead"], ["trainer.compile_mode=reduce-overhead needs trainer.compile=true"]),
    (["trainer.compile=true", "trainer.compile_mode=fast"], ["trainer.compile_mode='fast'", "reduce-overhead"]),
    (["+trainer.foo=1"], ["trainer.foo"]),
    (["trainer.foo=1"], ["trainer.foo"]),  # without '+': Hydra refuses it itself
    (["+foo=1"], ["foo"]),
    # Hydra's app settings have no @hydra.main to read them: ignored without a word
    (["hydra.mode=MULTIRUN"], ["hydra.mode=MULTIRUN: of Hydra's own settings only hydra.run.dir and hydra.sweep.dir are "
                               "read", "for a sweep use allconv-hpc submit -m key=a,b"]),
    (["hydra.job.chdir=true"], ["train runs in the folder it is started in"]),
    (["+hydra.foo=1"], ["+hydra.foo=1: of Hydra's own settings", "drop it: it would be ignored"]),
    (["hydra.run={dir:/tmp/x}"], ["give the folder as hydra.run.dir=..."]),  # it would be read: not "ignored"
    (["hydra.sweep={dir:/tmp/x}"], ["give the folder as hydra.sweep.dir=..."]),
    (["hydra={job: {chdir: true}}"], ["hydra={job: {chdir: true}}: of Hydra's own settings only", "hydra.run.dir=..."]),
    (["lr=0.1"], ["Could not override 'lr'", "did you mean optim.lr?"]),  # a key without its group
    (["data.root=a=b"], ["a value holding '=' needs quotes: \"data.root='a=b'\""]),  # what the shell must pass
    (["cluster.setup=[export A=b, module load x]"],
     ["list items holding '=' need quotes each: \"cluster.setup=['export A=b','module load x']\""]),
    # the seed's net by name only would keep allcnn_c's input dropout: neither net, under the seed's name
    (["model.name=allcnn_seed"], ["input_dropout: 0.2, model=allcnn_seed has 0.0", "use model=allcnn_seed for the "
                                  "net as defined, or model=allcnn_seed model.input_dropout=0.2 for these values"]),
    # the same for a schedule (inverse_time's decay, constant's warm-up) and a dataset (synthetic's sizes, augment)
    (["schedule.name=inverse_time"], ["decay: 0.0, schedule=inverse_time has 1e-06", "use schedule=inverse_time for the "
                                      "schedule as defined, or schedule=inverse_time schedule.decay=0.0 "
                                      "schedule.warmup_epochs=1.0 for these values"]),
    # two at once: each is checked on its own (each check's composition had refused the other's swap, and took
    # that for "no such option": both passed)
    (["model.name=allcnn_seed", "schedule.name=inverse_time"], ["model.name=allcnn_seed swaps the architecture"]),
    (["schedule.name=inverse_time", "data.name=cifar10"], ["schedule.name=inverse_time swaps the schedule"]),
    (["hydra/launcher=submitit_slurm"], ["cluster settings are cluster=slurm and cluster.<key>"]),
    (["data.name=cifar10"], ["data.name=cifar10 swaps the dataset", "train_size: 2048, data=cifar10 has null",
                             "data=cifar10 data.augment='none' data.test_size=512 data.train_size=2048 for these"]),
    (["modle=allcnn_c"], ["Did you mean model?", "The top level takes the groups model, data, optim"]),
    (["modle.width=0.5"], ["Could not override 'modle.width'. There is no group 'modle'. Did you mean model.width?"]),
    (["optimizer.lr=0.1"], ["There is no group 'optimizer'. Did you mean optim.lr?"]),
    (["modle.lr=0.1"], ["There is no group 'modle'. Did you mean optim.lr?"]),  # model has no lr
    (["wandb.tags=[a,[b,~c]]"], ["quote each list item with such characters (a quoted list is one string)"]),
    (["+seed=3"], ["+seed=3: seed is already in the config (+ adds a new key); give seed=3"]),
    (["schedule.milestones=[200,,300]"], ["a comma with no item beside it: did you mean schedule.milestones=[200,300]?"]),
    (["schedule.milestones=[200,250,]"], ["did you mean schedule.milestones=[200,250]?"]),
    (["data.augment=mixup"], ["data.augment='mixup'", "paper"]),
    (["schedule.name=linear"], ["schedule.name='linear'"]),
    (["schedule=nope"], ["schedule/nope"]),
    (["optim.momentum=1.5"], ["optim.momentum=1.5"]),
    (["wandb.mode=maybe"], ["wandb.mode='maybe'"]),
    (["data.train_size=0"], ["data.train_size=0"]),
    (["data.val_size=-1"], ["data.val_size=-1", ">= 0"]),
    # inf/nan pass every range check (inf > 0): refused as such, not after an epoch of gradient ascent
    (["optim.lr=inf"], ["optim.lr=inf", "must be a finite number"]),
    (["schedule.warmup_epochs=nan"], ["schedule.warmup_epochs=nan", "must be a finite number"]),
    (["schedule.gamma=-1"], ["schedule.gamma=-1", "> 0"]),
    (["schedule.milestones=[a,b]"], ["schedule.milestones=['a', 'b'] must be whole epochs"]),
    (["schedule.milestones=[200,200]"], ["schedule.milestones=[200, 200] must be strictly increasing"]),  # gamma twice
    (["trainer.threads=100000"], ["trainer.threads=100000 is more than any node has cores for (at most 1024)"]),
    (["checkpoint.signal=KILL"], ["checkpoint.signal=KILL cannot be caught", "USR2"]),
    (["checkpoint.signal=CHLD"], ["checkpoint.signal=CHLD has a meaning of its own", "use USR1 or USR2"]),
    (["checkpoint.signal=SIGTERM"], ["checkpoint.signal=SIGTERM has a meaning of its own"]),
    (["wandb.project=''"], ["wandb.project='' is empty (an unset shell variable?)"]),
    (["hydra.run.dir="], ["hydra.run.dir is empty (an unset shell variable?)"]),  # would train into cwd
    (["hydra.sweep.dir="], ["hydra.sweep.dir is empty"]),
    # a comma list is a sweep to Hydra: the fix for one value depends on the key's type (quoting a list or a
    # number gave a string, refused next)
    (["seed=0,1"], ["'seed=0,1' is a sweep (`allconv-hpc submit -m` submits one job per value); seed takes one value"]),
    (["schedule.milestones=100,200"], ["one list is given in brackets: 'schedule.milestones=[100,200]'"]),
    (["wandb.tags=a,b"], ["one list is given in brackets: 'wandb.tags=[a,b]'"]),
    (["optim.lr=0.05,0.1"], ["optim.lr takes one value"]),
    (["wandb.name=a,b"], ["one value holding commas is quoted: 'wandb.name=\"a,b\"'"]),
    (["model=allcnn_a,allcnn_b"], ["'model=allcnn_a,allcnn_b' is a sweep", "; model takes one option"]),
    (["optim.lr=0.01,", "0.02"], ["a space after a comma made two words of the list: give optim.lr=0.01,0.02 (no "
                                  "spaces), or quote it whole"]),  # the shell's split of `optim.lr=0.01, 0.02`
    (["optim.lr=0.01,"], ["a comma with no item beside it: did you mean optim.lr=0.01?"]),
    # Hydra's other sweeps alike (Hydra's own line named --multirun, which train refuses)
    (["optim.lr=choice(0.1,0.2)"], ["'optim.lr=choice(0.1,0.2)' is a sweep (`allconv-hpc submit -m`",
                                    "; give optim.lr one value"]),
    (["optim.lr=range(0.1,0.3,0.1)"], ["'optim.lr=range(0.1,0.3,0.1)' is a sweep", "; give optim.lr one value"]),
    (["wandb.tags=choice(a,b)"], ["'wandb.tags=choice(a,b)' is a sweep", "; give wandb.tags one value"]),  # no [...]
    (["model=glob(allcnn_*)"], ["'model=glob(allcnn_*)' is a sweep", "; model takes one option"]),
    (["trainer.precision=fp32,bf16"], ["; trainer.precision takes one value"]),  # one of a set: no quotes
    (["model.widht=0.5"], ["model has no key 'widht'; its keys: ", "width"]),
    (["data.train_size=1000000000000"], ["data.train_size=1000000000000 is more synthetic images than generating"]),
    (["trainer.batch_size=256", "trainer.drop_last=true", "data.train_size=128"],
     ["trainer.batch_size=256 with trainer.drop_last=true leaves no step in an epoch of 128 training images"]),
    # sizes past the official CIFAR counts, caught before a job waits in a queue
    (["data.name=cifar10", "data.val_size=50000"], ["data.val_size=50000 leaves no cifar10 training image"]),
    (["data.name=cifar10", "data.val_size=5000", "data.train_size=45001"],
     ["data.train_size=45001 is larger than the 45000 cifar10 images left after data.val_size=5000"]),
    (["data.name=cifar100", "data.num_classes=100", "data.test_size=10001"], ["data.test_size=10001", "<= 10000"]),
    (["model.num_classes=5"], ["model.num_classes=5 != data.num_classes=10: the data group sets both (data=cifar100 "
                               "for 100 classes); leave model.num_classes out"]),
    (["trainer.log_every_steps=0"], ["trainer.log_every_steps=0"]),
    # past float32 (the optimizer's), or too wide to build: a traceback at the first step or the model build before
    (["hydra.run.dir=~/x"], ["quote a value with such characters: \"hydra.run.dir='~/x'\""]),  # Hydra's lexer
    # a list's items, each (quoting the whole list gave a string, refused next as no list)
    (["cluster.setup=[module load x, source ~/v/bin/activate]"],
     ["quote each list item with such characters: \"cluster.setup=[module load x, 'source ~/v/bin/activate']\""]),
    (["optim.lr"], ["give key=value without spaces around '=' or leading dashes"]),  # `optim.lr = 0.1`
    (["--optim.lr=0.1"], ["give key=value without spaces around '=' or leading dashes"]),
    (["data=cifar10", "data.root="], ["data.root is empty (an ALLCONV_DATA set to nothing"]),
    (["~trainer.epochs"], ["~trainer.epochs deletes trainer.epochs, which every run has; set it instead"]),
    (["optim.lr=1e39"], ["optim.lr=1e+39 is beyond float32's range", "give a smaller value"]),
    (["wandb.tags=foo"], ["wandb.tags='foo' must be a list, e.g. wandb.tags=[foo]"]),
    (["optim.weight_decay=1e300"], ["optim.weight_decay=1e+300 is beyond float32's range"]),
    (["optim.lr=1e-46"], ["optim.lr=1e-46 is below float32's smallest normal number", "would take it as 0 or nearly; give a larger value"]),
    (["optim.weight_decay=1e-40"], ["optim.weight_decay=1e-40 is below float32's", "give a larger value (or 0)"]),
    (["optim.lr=1e37", "optim.scale_lr=true", "trainer.batch_size=12800"],
     ["optim.lr=1e+37 scaled by optim.scale_lr to 1e+39 is beyond float32's range"]),
    (["model.width=1e6"], ["model.width=1000000.0 is wider than 64"]),
    # the bound said is the true one (it said >= 0.01042, while 0.006 builds)
    (["model.width=0.005"], ["model.width=0.005 makes a 96-channel layer empty", "use width >= 0.005209"]),
    (["schedule.milestones=[-1]"], ["schedule.milestones=[-1] must be positive epochs"]),
    # nulls and quotes that Hydra's own words left unexplained
    (["model=null"], ["model=null: a config group takes one of its options, not null", "allconv-hpc train --help"]),
    (["hydra.run.dir=null"], ["hydra.run.dir=null: hydra.run.dir is a folder; give one, e.g. hydra.run.dir=runs/x"]),
    (["~hydra.run.dir"], ["~hydra.run.dir: hydra.run.dir is a folder"]),
    (["'optim.lr'=0.1"], ["Hydra cannot parse it; a key takes no quotes: optim.lr=0.1"]),
    (["optim.lr =0.1"], ["Hydra cannot parse it; give key=value without spaces around '='"]),
    # types: dataclasses do not enforce them, config.py does
    (["trainer.epochs=2.5"], ["trainer.epochs=2.5", "must be an int"]),
    (["trainer.batch_size=100.5"], ["trainer.batch_size=100.5", "must be an int"]),
    (["trainer.epochs=1e2"], ["trainer.epochs=100.0 must be an int (a whole number: trainer.epochs=100)"]),
    # Hydra's own fixes lead nowhere: yaml's `override` syntax; a `+` that the next check refuses
    (["+experiment=fast"], ["+experiment=fast: experiment already has an option", "give experiment=fast without the +"]),
    (["cluster.additional_parameters.time=5"], ["cluster.additional_parameters.time would override what submit sets "
                                                "itself; use cluster.timeout_min"]),
    (["model.dropout=maybe"], ["model.dropout='maybe'", "must be a bool (true or false)"]),
    (["seed=1.5"], ["seed=1.5", "must be an int"]),
    (["seed=-1"], ["seed=-1", "[0, 2**32)"]),
    (["seed=100000000000000"], ["seed=100000000000000", "[0, 2**32)"]),  # overflowed torch's seed after setup
    (["optim.lr=fast"], ["optim.lr='fast'", "must be a float"]),
    (["trainer.epochs=null"], ["trainer.epochs=null is not allowed"]),
    (["data.train_size=true"], ["data.train_size=True", "must be an int", "or null"]),
    (["schedule.milestones=5"], ["schedule.milestones=5", "must be a list"]),
    # a sweep point's folder, unquoted: the override is named and the quotes shown
    (["hydra.run.dir=sweeps/s/model=allcnn_c,seed=0"],
     ["bad override 'hydra.run.dir=sweeps/s/model=allcnn_c,seed=0'", "hydra.run.dir='sweeps/s/model=allcnn_c,seed=0'"]),
    (["optim.lr=[0.1"], ["bad override 'optim.lr=[0.1'"]),
    (["hydra.run.dir=runs/my sweep's dir"],  # Hydra's lexer error alone; the fix as the shell takes it
     ['needs double quotes around it: "hydra.run.dir=\\"runs/my sweep\'s dir\\""']),
    # a misspelt group option lists the group's options (Hydra's lines after the first)
    (["cluster=slurmm"], ["Could not find 'cluster/slurmm' (available: gpu_example, local, slurm)"]),
    (["experiment=fats"], ["experiment/fats' (available: fast, paper_allcnn_c_cifar10, seed_keras)"]),
    # a misspelt cluster key lists the cluster keys, as one of optim.* does its own
    (["cluster.partiton=high"], ["cluster has no key 'partiton'; its keys: ", "partition, qos,"]),
    # a new key inside a dict-valued cluster key is not a misspelling: Hydra's '+' hint is kept
    (["cluster.additional_parameters.mail-type=END"],
     ["use +cluster.additional_parameters.mail-type=END"]),
]


def test_train_refuses_a_sweep_and_a_run_folder_under_a_file(tmp_path):
    import subprocess
    import sys

    def train(*args):  # a process of its own: `train` sets this process's signal dispositions
        return subprocess.run([sys.executable, "-m", "allconv_hpc", "train", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
    r = train("-m", "seed=0,1")
    assert r.returncode == 2 and "a sweep is `allconv-hpc submit -m ...`" in r.stderr
    (tmp_path / "afile").write_text("")
    r = train("data=synthetic", f"hydra.run.dir={tmp_path / 'afile' / 'run'}")
    assert r.returncode == 2 and "afile is a file, not a folder; give another hydra.run.dir" in r.stderr
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)  # a folder that is not a run's
    r = train("data=synthetic", f"hydra.run.dir={tmp_path / 'data'}")
    assert r.returncode == 2 and (f"run folder {tmp_path / 'data'} holds other files (cifar-10-batches-py) and no "
                                  f"run") in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-batches-py"]  # nothing written
    from allconv_hpc.compose import check_run_dir
    (tmp_path / "pre").mkdir()  # made for sbatch --output=$RUN/slurm-%j.out: a run's folder to be
    (tmp_path / "pre" / "slurm-12.out").write_text("")
    (tmp_path / "pre" / ".submission.json.ab12.tmp").write_text("")
    (tmp_path / "pre" / ".DS_Store").write_text("")  # a desktop's and a notebook's clutter: no one's files
    (tmp_path / "pre" / "._.ipynb_checkpoints").write_text("")  # macOS's AppleDouble twin, on a volume not its own
    (tmp_path / "pre" / ".ipynb_checkpoints").mkdir()
    check_run_dir(tmp_path / "pre")
    (tmp_path / "proj" / "src").mkdir(parents=True)  # a project's root with a job log in it is still a project's
    for name in ("README.md", "nohup.out", "pyproject.toml", "train.log"):
        (tmp_path / "proj" / name).write_text("")
    (tmp_path / "proj" / "wandb").mkdir()  # the project's own W&B runs: names other tools write too
    with pytest.raises(ConfigError, match=r"holds other files \(README.md, pyproject.toml, src\) and no run"):
        check_run_dir(tmp_path / "proj")
    (tmp_path / "pre" / "notes.md").write_text("")  # notes beside a run's files: its own folder still
    (tmp_path / "pre" / "status.json").write_text("{}")
    check_run_dir(tmp_path / "pre")
    (tmp_path / "pre" / "history.csv").mkdir()  # a folder where the run writes a file: it failed at that write,
    r = train("data=synthetic", f"hydra.run.dir={tmp_path / 'pre'}")  # after the data load, as a quota problem
    assert r.returncode == 2 and (f"{tmp_path / 'pre' / 'history.csv'} is a folder, where the run writes its file; "
                                  f"move it away, or give another hydra.run.dir") in r.stderr, r.stderr
    assert not (tmp_path / "pre" / ".hydra").exists()  # refused before anything was written
    (tmp_path / "pre" / "history.csv").rmdir()
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", ".train.lock", ".hydra/config.yaml"):
        (tmp_path / "pre" / name).mkdir(parents=True)  # last.pt: found once an epoch was trained, exit 1
        with pytest.raises(ConfigError, match=f"{tmp_path / 'pre' / name} is a folder, where the run writes its file; "
                                              f"move it away, or give another hydra.run.dir"):
            check_run_dir(tmp_path / "pre")
        (tmp_path / "pre" / name).rmdir()
    check_run_dir(tmp_path / "pre")
    r = train("--cfg", "job")  # Hydra's own flag: named, with what this command takes instead
    assert r.returncode == 2 and "train takes Hydra overrides (key=value), not --cfg; --print-config" in r.stderr


def test_print_config_shows_the_composed_config_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    import yaml
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "--print-config", "experiment=fast",
                        "optim.lr=0.2", "data.root=rel", "hydra.run.dir=runs/x"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    head, body = r.stdout.split("\n", 1)
    assert head == f"# run folder: {tmp_path / 'runs' / 'x'}"
    cfg = yaml.safe_load(body)
    assert cfg["optim"]["lr"] == 0.2 and cfg["schedule"]["name"] == "onecycle"  # the experiment, then the override
    assert cfg["data"]["root"] == str(tmp_path / "rel")  # as the run would record it
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert r.stderr == ""  # nothing to warn of
    # what train would warn of, after the config, on stderr (stdout stays the config alone)
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "--print-config", "trainer.epochs=100",
                        "schedule.decay=0.5"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["trainer"]["epochs"] == 100, r.stderr
    assert [line.split(":", 3)[2].strip() for line in r.stderr.splitlines()] == [
        "schedule.milestones=[200,250,300]", "schedule.decay=0.5"], r.stderr
    assert r.stderr.startswith("allconv-hpc: warning: schedule.milestones=[200,250,300]: the run (trainer.epochs=100)")
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "--print-config", "data=synthetic",
                        "cluster.tasks_per_node=4"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == (  # as train says it: a user expecting 4 ranks from it
        "allconv-hpc: warning: cluster.tasks_per_node=4: cluster settings are read by allconv-hpc submit only; train "
        "runs as it was launched (one process, or the ranks torchrun starts)\n"), r.stderr
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "--print-config", "data=synthetic",
                        "hydra.sweep.dir=sw"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == (  # it was ignored without a word
        f"allconv-hpc: warning: hydra.sweep.dir=sw: train reads no sweep folder (allconv-hpc submit -m does); it "
        f"trains in hydra.run.dir={tmp_path / 'runs' / 'allcnn_c-synthetic-seed0'}\n"), r.stderr
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "--print-config", "data=synthetic",
                        "optim.lr=0.1", "model=allcnn_b", "seed=3", "optim.lr=0.2", "model=allcnn_c", "seed=3"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    cfg = yaml.safe_load(r.stdout)
    assert r.returncode == 0 and cfg["optim"]["lr"] == 0.2 and cfg["model"]["name"] == "allcnn_c", r.stderr
    assert r.stderr == (  # Hydra keeps the last without a word (seed=3 twice: the same, said nowhere)
        "allconv-hpc: warning: optim.lr is given twice (optim.lr=0.1 then optim.lr=0.2): the last, optim.lr=0.2, is "
        "the one used\nallconv-hpc: warning: model is given twice (model=allcnn_b then model=allcnn_c): the last, "
        "model=allcnn_c, is the one used\n"), r.stderr
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "--print-config", "optim.lr=-1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "allconv-hpc: error: optim.lr=-1 must be > 0"
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "--print-config", "-m", "seed=0,1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)  # as train says it
    assert r.returncode == 2 and r.stderr.strip() == ("allconv-hpc: error: train runs one config; a sweep is "
                                                      "`allconv-hpc submit -m ...` (with cluster=local it runs on "
                                                      "this machine)"), r.stderr


@pytest.mark.parametrize("overrides,needles", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_one_clear_line_before_any_work(overrides, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder would be tmp_path/runs/...
    with pytest.raises(ConfigError) as e:
        compose(["data=synthetic", *overrides])
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_typo_is_said_before_torch_is_imported(tmp_path):
    """`train` with a misspelt key: refused before the seconds of torch's import (a login node, a script's typo)."""
    code = ("import sys; from allconv_hpc.cli import main; rc = main(['train', 'traner.epochs=3']); "
            "print(rc, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "SUBMITIT_LOCAL_NTASKS", "SLURM_STEP_NUM_TASKS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.stdout.split() == ["2", "False"] and "Did you mean trainer.epochs?" in r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_data_root_names_the_folder_and_the_fix(name, folder):
    c = compose([f"data={name}", "data.root=/nonexistent"])  # composing never looks at files
    with pytest.raises(DataError) as e:
        check_present(c.cfg.data)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    assert f"/nonexistent/{folder}" in msg
    assert "data.root=" in msg and "data.download=true" in msg


def test_synthetic_data_needs_no_files():
    check_present(compose(["data=synthetic", "data.root=/nonexistent"]).cfg.data)


def test_data_root_from_environment(monkeypatch):
    monkeypatch.setenv("ALLCONV_DATA", "/somewhere/else")
    assert compose(["data=cifar10"]).cfg.data.root == "/somewhere/else"
    assert compose(["data=cifar10", "data.root=/x"]).cfg.data.root == "/x"


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        compose(["data=synthetic", *overrides])
    return str(e.value)


def test_a_misspelt_option_lists_every_option_of_its_group():
    import importlib.resources
    conf = importlib.resources.files("allconv_hpc.conf")
    for group, wrong in (("model", "allcnn_x"), ("cluster", "slurmm"), ("schedule", "cosin"), ("data", "cifar")):
        msg = _error([f"{group}={wrong}"])
        listed = re.search(rf"Could not find '{group}/{wrong}' \(available: ([^)]*)\)$", msg)
        assert listed, msg
        assert listed.group(1).split(", ") == sorted(f.name[:-5] for f in conf.joinpath(group).iterdir()
                                                     if f.name.endswith(".yaml"))


def test_a_misspelt_cluster_key_lists_the_launchers_keys():
    from allconv_hpc.config import CLUSTER_KEYS
    msg = _error(["cluster=local", "cluster.partiton=high"])
    listed = re.search(r"cluster has no key 'partiton'; its keys: (.*)$", msg)
    assert listed, msg
    assert listed.group(1).split(", ") == sorted(CLUSTER_KEYS)
    # every key a cluster profile sets is one the launcher takes: the list names what may be overridden
    for profile in ("local", "slurm", "gpu_example"):
        assert set(compose(["data=synthetic", f"cluster={profile}"]).cluster) <= CLUSTER_KEYS


# ----------------------------------------------------------------------------- the CLI


def _cli() -> str:
    exe = Path(sys.executable).with_name("allconv-hpc")
    return str(exe) if exe.exists() else shutil.which("allconv-hpc")


# The launch context (ranks, CUDA) is checked as early: a torchrun rank of 3 with a batch of 128.
RANK_OF_3 = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize("overrides,needle,extra_env", [
    (["model=nope"], "model/nope", {}),
    (["optim.lr=0"], "optim.lr=0 must be > 0", {}),
    (["cluster=slurmm"], "Could not find 'cluster/slurmm' (available: gpu_example, local, slurm)", {}),
    (["cluster.partiton=high"], "cluster has no key 'partiton'; its keys: account, additional_parameters,", {}),
    (["data=cifar10", "data.root=/nonexistent"], "/nonexistent/cifar-10-batches-py", {}),
    (["data=synthetic", "trainer.batch_size=128"], "not divisible by the world size 3", RANK_OF_3),
    (["data=synthetic", "data.train_size=64", "trainer.batch_size=63", "trainer.compile=true"],
     "the last step of each epoch holds 1 of the 64 training images, fewer than the 3 ranks", RANK_OF_3),
    pytest.param(["data=synthetic", "trainer.precision=bf16"], "trainer.precision=bf16 needs CUDA", {},
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks CUDA here")),
], ids=["unknown-model", "lr-zero", "cluster-option", "cluster-key", "missing-data", "batch-vs-ranks",
     "compile-empty-shard", "bf16-auto-no-cuda"])
def test_cli_bad_config_exits_2_with_one_line(overrides, needle, extra_env, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    r = subprocess.run([_cli(), "train", *overrides, f"hydra.run.dir={run_dir}", "trainer.progress=log"],
                       env={**clean_env(tmp_path), **extra_env}, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("allconv-hpc: error: ") and needle in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stdout.strip() == ""
    assert elapsed < 30, f"took {elapsed:.1f} s: the error should come before any work"
    assert not run_dir.exists()
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- experiment recipes


def test_experiment_paper_allcnn_c_cifar10():
    c = compose(["experiment=paper_allcnn_c_cifar10"])
    cfg = c.cfg
    assert (cfg.model.name, cfg.model.width, cfg.model.dropout) == ("allcnn_c", 1.0, True)
    assert (cfg.model.input_dropout, cfg.model.hidden_dropout) == (0.2, 0.5)
    assert (cfg.data.name, cfg.data.augment, cfg.data.num_classes) == ("cifar10", "paper", 10)
    # "stochastic gradient descent with fixed momentum of 0.9": plain momentum (Nesterov is the seed's Keras choice)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.05, 0.9, False, 0.001)
    assert cfg.optim.scale_lr is False and cfg.lr == 0.05
    assert (cfg.schedule.name, list(cfg.schedule.milestones), cfg.schedule.gamma) == ("paper", [200, 250, 300], 0.1)
    assert cfg.schedule.warmup_epochs == 0.0  # the paper has none
    assert cfg.model.final_relu is True  # the paper's table has a ReLU on the class scores
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (350, 128)
    assert c.run_dir.name == "allcnn_c-cifar10-seed0"
    assert "experiment" not in c.cfg_dict


def test_experiment_seed_keras():
    cfg = compose(["experiment=seed_keras", "data=synthetic"]).cfg  # data is the user's choice
    assert cfg.model.name == "allcnn_seed" and cfg.model.input_dropout == 0.0 and cfg.model.hidden_dropout == 0.5
    assert cfg.data.augment == "seed"
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.1, 0.9, True, 0.0)
    # SGD(lr=0.1, decay=1e-6, ...): Keras' decay shrinks the lr per update, it is not weight decay
    assert (cfg.schedule.name, cfg.schedule.decay, cfg.schedule.warmup_epochs) == ("inverse_time", 1e-6, 0.0)
    assert (cfg.trainer.batch_size, cfg.trainer.epochs) == (32, 350)
    assert compose(["experiment=seed_keras"]).cfg.data.name == "cifar10"


def test_experiment_fast():
    cfg = compose(["experiment=fast"]).cfg
    assert cfg.model.name == "allcnn_c"
    assert cfg.schedule.name == "onecycle"
    assert cfg.data.augment == "paper"
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.1, 0.0005)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.channels_last) == (60, 256, True)
    assert cfg.trainer.precision == "auto"  # bf16 on a GPU, fp32 on a CPU: the same command works on both
    assert cfg.trainer.drop_last  # one batch shape: torch.compile and CUDA graphs compile once
    assert compose(["experiment=fast", "trainer.device=cpu"]).cfg.trainer.precision == "auto"


def test_experiment_values_can_still_be_overridden():
    cfg = compose(["experiment=seed_keras", "optim.lr=0.01", "trainer.epochs=3", "model.width=0.5"]).cfg
    assert (cfg.optim.lr, cfg.trainer.epochs, cfg.model.width, cfg.trainer.batch_size) == (0.01, 3, 0.5, 32)
    # groups too (README: a recipe with another model or dataset); the recipe's own values stay
    cfg = compose(["experiment=paper_allcnn_c_cifar10", "model=allcnn_b", "data=cifar100"]).cfg
    assert (cfg.model.name, cfg.data.name, cfg.model.num_classes) == ("allcnn_b", "cifar100", 100)
    assert (cfg.model.final_relu, cfg.optim.nesterov, cfg.data.augment, cfg.schedule.warmup_epochs) == \
        (True, False, "paper", 0.0)


def test_unknown_experiment():
    with pytest.raises(ConfigError) as e:
        compose(["experiment=nope"])
    assert "experiment/nope" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("+experiment.optim.lr=0.5", "experiment is a group of recipes, picked with experiment=<recipe>; a recipe's key is "
                                 "set as itself"),
    ("++experiment={optim:{lr:0.2}}", "experiment is a group of recipes"),
    ("experiment=null", "experiment=null: no recipe is the default; leave experiment out"),
    ("schedule={name:inverse_time}", "schedule is a config group; pick an option with schedule=<option> and set its "
                                     "keys one at a time, schedule.<key>=value"),
    ("cluster={backend:slurm}", "cluster is a config group"),
    ("trainer={epochs:2}", "trainer is a config group"),
    ("dist.backend=nccl", "dist.backend=nccl needs CUDA, which trainer.device=cpu never uses"),
])
def test_overrides_that_went_past_every_check_are_refused(override, needle):
    """+experiment.optim.lr=0.5 was dropped without a word (experiment is no section); a group given as a dict
    (schedule={name:x}, cluster={backend:slurm}) merged past the checks of its dotted keys (a name swap, a
    profile's backend); nccl on CPU passed submit and failed in the job, after the queue."""
    with pytest.raises(ConfigError) as e:
        compose(["data=synthetic", "trainer.device=cpu", override])
    assert needle in str(e.value), str(e.value)


def test_defaults_are_the_paper():
    cfg = compose([]).cfg
    assert (cfg.model.name, cfg.data.name, cfg.optim.lr, cfg.optim.weight_decay) == ("allcnn_c", "cifar10", 0.05, 0.001)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.precision) == (350, 128, "fp32")
    assert cfg.schedule.name == "paper" and list(cfg.schedule.milestones) == [200, 250, 300]


def test_dataclass_defaults_are_the_yaml_defaults():
    # Python callers (Config.from_dict, benchmarks) must get what `allconv-hpc train` gets
    cfg = compose([]).cfg
    differ = [f"{name}.{f.name}: {getattr(cls(), f.name)!r} vs {getattr(getattr(cfg, name), f.name)!r}"
              for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if getattr(cls(), f.name) != getattr(getattr(cfg, name), f.name)]
    assert differ == []


def test_linear_lr_scaling_is_a_switch_off_by_default():
    assert compose(["trainer.batch_size=512"]).cfg.lr == 0.05  # lr refers to the global batch as given
    cfg = compose(["trainer.batch_size=512", "optim.scale_lr=true", "optim.base_batch_size=128"]).cfg
    assert cfg.lr == pytest.approx(0.2)


def test_train_help_lists_the_config_groups(tmp_path):
    r = subprocess.run([_cli(), "train", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env=clean_env(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    groups = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.startswith("  ")}
    assert groups["model"] == " | ".join(sorted(MODEL_NAMES)).split()
    assert "fast" in groups["experiment"] and "onecycle" in groups["schedule"]
    assert not (tmp_path / "runs").exists()  # help trains nothing


def test_resumable_change_is_one_reading_for_trainer_and_launcher():
    """Keys, not prefixes of words: 'trainer.epochs' and whole groups such as 'wandb' may change on a
    resume; 'trainer.epochs_x' or 'optim.lr' may not. The identity a checkpoint records drops exactly those."""
    from allconv_hpc.config import Config, resumable_change
    assert resumable_change("trainer.epochs") and resumable_change("wandb") and resumable_change("wandb.mode")
    assert not resumable_change("trainer.epochs_x") and not resumable_change("trainer")
    assert not resumable_change("optim.lr") and not resumable_change("cluster.nodes")
    assert resumable_change("cluster.nodes", also=("cluster",)) and resumable_change("cluster", also=("cluster",))
    ident = Config().identity()
    assert "optim.lr" in ident and "model.name" in ident
    assert not any(resumable_change(k) for k in ident)
    assert not any(k.startswith(("trainer.epochs", "wandb.", "checkpoint.", "dist.")) for k in ident)


def test_a_key_added_since_a_checkpoint_counts_at_its_default():
    """A checkpoint's identity from before a key existed (e.g. schedule.decay) resumes when the key is at
    its default (what that version did), and is refused, naming it, when it is not."""
    from allconv_hpc.config import Config
    old = Config().identity()
    del old["schedule.decay"], old["data.val_size"], old["data.preprocess"]
    Config().check_resumable(old, "run")
    with pytest.raises(ConfigError, match=r"data.val_size: 0 -> 5000"):
        compose(["data.val_size=5000"]).cfg.check_resumable(old, "run")
    with pytest.raises(ConfigError, match=r"data.preprocess: 'channel' -> 'gcn_zca'"):
        compose(["data.preprocess=gcn_zca"]).cfg.check_resumable(old, "run")
    seed = compose(["experiment=seed_keras"]).cfg
    old = {**seed.identity(), "schedule.name": "constant"}
    del old["schedule.decay"]
    with pytest.raises(ConfigError, match=r"schedule.decay: 0.0 -> 1e-06; schedule.name: 'constant' -> 'inverse_time'"):
        seed.check_resumable(old, "run")
    compose(["experiment=seed_keras", "schedule=constant"]).cfg.check_resumable(old, "run")  # README's way on
    with pytest.raises(ConfigError, match="different config"):  # no identity at all: not backfilled
        Config().check_resumable({}, "run")
    # values as an override writes them, so the message can be pasted back
    with pytest.raises(ConfigError, match=r"data.train_size: null -> 100; model.dropout: true -> false"):
        compose(["model.dropout=false", "data.train_size=100"]).cfg.check_resumable(Config().identity(), "run")
    # a list as one shell word: "[1, 2]" pasted unquoted split into two arguments, the first refused
    with pytest.raises(ConfigError, match=r"override left out of this command, or one given by mistake\? "
                                          r"schedule.milestones=\[1,2\] resumes"):
        Config().check_resumable(compose(["schedule.milestones=[1,2]"]).cfg.identity(), "run")


def test_wandb_online_without_a_key_or_a_bad_wandb_mode_is_refused_before_any_work(tmp_path):
    """Found at wandb.init it would cost the data load and model build, and under submit the job's queue wait;
    an explicit online with no key anywhere would quietly log offline."""
    tiny = ["data=synthetic", "data.train_size=64", "data.test_size=32", "model.width=0.125"]
    cases = [(["wandb.mode=online"], {}, "wandb.mode=online but no W&B API key is configured here"),
             ([], {"WANDB_MODE": "bogus"}, "environment WANDB_MODE='bogus' is not one of online, offline, disabled")]
    for extra, env, needle in cases:
        for cmd in (["train"], ["submit", "--dry-run", "cluster=local"]):
            run = tmp_path / "run"
            r = subprocess.run([sys.executable, "-m", "allconv_hpc", *cmd, *tiny, *extra, f"hydra.run.dir={run}"],
                               env=clean_env(tmp_path, **env), capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
            assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
            assert not run.exists(), cmd  # nothing made, nothing queued
    # a cluster.setup may set W&B variables for the job (here through a sourced file): a warning, and the job's
    # own train checks it
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "submit", "--dry-run", "cluster=local", *tiny,
                        "wandb.mode=online", "cluster.setup=['source ~/secrets.sh']",
                        f"hydra.run.dir={tmp_path / 'run'}"], env=clean_env(tmp_path), capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ("warning: wandb.mode=online but no W&B API key is configured here" in r.stderr
            and "unless cluster.setup sets it for the job" in r.stderr), r.stderr


def test_model_name_alone_is_taken_where_it_changes_nothing_else():
    assert compose(["data=synthetic", "model.name=model_c"]).cfg.model.name == "model_c"  # same settings
    m = compose(["data=synthetic", "model.name=allcnn_seed", "model.input_dropout=0.0"]).cfg.model
    assert (m.name, m.input_dropout) == ("allcnn_seed", 0.0)  # what differs is given: the user's choice
    old = compose(["data=synthetic", "model=allcnn_c", "model.name=allcnn_seed", "model.input_dropout=0.2"]).cfg
    said = compose(["data=synthetic", "model=allcnn_seed", "model.input_dropout=0.2"]).cfg  # what the error offers
    assert said.identity() == old.identity()  # a run started with model.name alone resumes with it
    old = compose(["data=synthetic", "schedule.name=constant", "schedule.warmup_epochs=1.0"]).cfg  # given: taken
    said = compose(["data=synthetic", "schedule=constant", "schedule.warmup_epochs=1.0"]).cfg
    assert old.schedule.name == "constant" and said.identity() == old.identity()
    # what differs only in keys the option never reads (onecycle's warm-up; the rates with dropout off) is the same run
    for swap, group in (["schedule.name=onecycle"], ["schedule=onecycle"]), (
            ["model.name=allcnn_seed", "model.dropout=false"], ["model=allcnn_seed", "model.dropout=false"]):
        swapped = compose(["data=synthetic", *swap]).cfg
        compose(["data=synthetic", *group]).cfg.check_resumable(swapped.identity(), "run")  # no refusal either way


def test_a_quoted_tilde_in_the_run_folder_is_the_home_folder(monkeypatch, tmp_path):
    """As for data.root: a folder literally named `~` in the current one is a `rm -rf ~` waiting to happen."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compose(["data=synthetic", "hydra.run.dir='~/runs/x'"]).run_dir == tmp_path / "runs" / "x"


def test_a_warm_up_longer_than_the_run_is_warned_not_refused():
    """Legal (a run begun so resumes with it), but the lr never reaches optim.lr: train and submit say so."""
    cfg = compose(["data=synthetic", "trainer.epochs=2", "schedule.warmup_epochs=3"]).cfg
    assert cfg.warnings() == ["schedule.warmup_epochs=3 is longer than trainer.epochs=2: the learning rate never "
                              "reaches optim.lr (schedule.warmup_epochs=0 for no warm-up)"]
    assert compose(["data=synthetic", "trainer.epochs=2", "schedule=onecycle", "schedule.warmup_epochs=3"]).cfg \
        .warnings() == []  # onecycle's rise is its warm-up


def test_milestones_none_of_which_the_run_reaches_are_warned():
    """The paper's steps at 200/250/300 in a 100-epoch run: the lr never decays. Warned (not refused: a run begun so
    resumes with it) only when no milestone is reached; a milestone at trainer.epochs is reached by no step."""
    cfg = compose(["trainer.epochs=100"]).cfg
    assert cfg.warnings() == ["schedule.milestones=[200,250,300]: the run (trainer.epochs=100) ends before the first, "
                              "epoch 200, so the learning rate never decays; give milestones within the run, e.g. "
                              "schedule.milestones=[57,71,86] (the paper's 200/250/300 of 350 epochs, scaled) or "
                              "schedule=cosine"]
    assert compose(["trainer.epochs=200", "schedule.milestones=[200]"]).cfg.warnings()[0].startswith(
        "schedule.milestones=[200]: the run (trainer.epochs=200) ends before the first, epoch 200")
    assert compose(["trainer.epochs=1"]).cfg.warnings()[0].endswith("e.g. schedule=cosine")  # no milestone fits
    assert compose(["schedule.gamma=5"]).cfg.warnings() == [
        "schedule.gamma=5 is over 1: the learning rate grows at each milestone (the paper's steps divide it by 10: "
        "gamma=0.1)"]
    assert compose(["schedule.gamma=1"]).cfg.warnings() == []  # one lr throughout: legal, plain
    for fine in (["trainer.epochs=201"], ["trainer.epochs=260"],  # one milestone reached: a run cut short on purpose
                 ["trainer.epochs=100", "schedule=cosine"], ["trainer.epochs=100", "schedule.milestones=[]"],
                 ["trainer.epochs=3", "data=synthetic"]):  # generated data: a plumbing check, one lr by design
        assert compose(fine).cfg.warnings() == [], fine


def test_dropout_rates_with_dropout_off_are_said_to_change_nothing(tmp_path):
    """model.dropout=false: models.build_model reads neither rate, so giving one changes nothing (said, as for a
    schedule's unused key), a sweep over one trains alike points, and a resume may change one."""
    from allconv_hpc.compose import unread_overrides, unread_said
    c = compose(["data=synthetic", "model.dropout=false", "model.input_dropout=0.1", "schedule.decay=0.5"])
    assert list(unread_overrides(c).values()) == [
        "model.input_dropout=0.1: model.dropout=false turns it off, so it changes nothing",
        "schedule.decay=0.5: schedule=paper does not read it, so it changes nothing"]
    assert unread_overrides(compose(["data=synthetic", "model.input_dropout=0.1"])) == {}  # dropout on: read
    point = ["model.input_dropout=0.3", "model.hidden_dropout=0.2", "schedule.decay=0.5"]
    c = compose(["data=synthetic", "model.dropout=false", "schedule.final_lr_ratio=0.1", *point])
    assert unread_said(c, point) == [
        "the sweep varies model.hidden_dropout, model.input_dropout, which model.dropout=false turns off: such points "
        "train alike", "the sweep varies schedule.decay, which schedule=paper does not read: such points train alike",
        "schedule.final_lr_ratio=0.1: schedule=paper does not read it, so it changes nothing"]
    off = compose(["data=synthetic", "model.dropout=false"]).cfg
    compose(["data=synthetic", "model.dropout=false", "model.hidden_dropout=0.1"]).cfg.check_resumable(
        off.identity(), tmp_path)
    with pytest.raises(ConfigError, match=r"model.dropout: false -> true"):  # turned on: the rates count again
        compose(["data=synthetic", "model.hidden_dropout=0.1"]).cfg.check_resumable(off.identity(), tmp_path)
    with pytest.raises(ConfigError, match=r"different config \(model.hidden_dropout: 0.5 -> 0.1\)"):
        compose(["data=synthetic", "model.hidden_dropout=0.1"]).cfg.check_resumable(
            compose(["data=synthetic"]).cfg.identity(), tmp_path)


def test_a_base_batch_size_without_lr_scaling_is_said_to_change_nothing(tmp_path):
    """optim.base_batch_size is read by optim.scale_lr alone: given without it, it is warned of as a schedule's
    unused key is, and a resume may change it (it was refused as a run of another config)."""
    from allconv_hpc.compose import unread_overrides
    c = compose(["data=synthetic", "optim.base_batch_size=256"])
    assert list(unread_overrides(c).values()) == [
        "optim.base_batch_size=256: optim.scale_lr=false does not read it, so it changes nothing"]
    assert c.cfg.lr == compose(["data=synthetic"]).cfg.lr
    c.cfg.check_resumable(compose(["data=synthetic"]).cfg.identity(), tmp_path)
    scaled = compose(["data=synthetic", "optim.scale_lr=true", "optim.base_batch_size=256"])
    assert unread_overrides(scaled) == {} and scaled.cfg.lr != compose(["data=synthetic", "optim.scale_lr=true"]).cfg.lr
    with pytest.raises(ConfigError, match=r"different config \(optim.base_batch_size: 128 -> 256\)"):
        scaled.cfg.check_resumable(compose(["data=synthetic", "optim.scale_lr=true"]).cfg.identity(), tmp_path)


def test_plain_sgd_is_refused_with_the_key_to_add():
    with pytest.raises(ConfigError, match=r"^optim.nesterov=true \(the default\) needs optim.momentum > 0; for plain "
                                          r"SGD \(optim.momentum=0\) add optim.nesterov=false$"):
        compose(["data=synthetic", "optim.momentum=0"])
    assert compose(["data=synthetic", "optim.momentum=0", "optim.nesterov=false"]).cfg.optim.momentum == 0


@pytest.mark.parametrize("name", ["paper", "cosine", "onecycle", "constant", "inverse_time"])
def test_a_schedules_unused_keys_are_the_ones_its_lr_never_reads(name):
    """ScheduleConfig.unused() against schedule.lr_factor itself: changing an unused key leaves every step's lr as
    it was; changing any other key changes some step's lr."""
    from allconv_hpc.config import ScheduleConfig
    from allconv_hpc.schedule import lr_factor
    base = ScheduleConfig(name=name, milestones=[2, 3], warmup_epochs=1.0, final_lr_ratio=0.1, decay=0.01)
    other = {"milestones": [1, 4], "gamma": 0.5, "warmup_epochs": 0.5, "final_lr_ratio": 0.3, "pct_start": 0.5,
             "decay": 0.1}
    curve = lambda cfg: [lr_factor(step, cfg, 10, 5) for step in range(50)]  # noqa: E731
    for key, value in other.items():
        changed = curve(dataclasses.replace(base, **{key: value})) != curve(base)
        assert changed == (f"schedule.{key}" not in base.unused()), (name, key)


def test_a_key_the_schedule_never_reads_may_change_on_resume(tmp_path):
    c = compose(["data=synthetic", "schedule=onecycle"]).cfg
    changed = compose(["data=synthetic", "schedule=onecycle", "schedule.warmup_epochs=3", "schedule.decay=0.5"]).cfg
    changed.check_resumable(c.identity(), tmp_path)  # onecycle reads neither
    with pytest.raises(ConfigError, match=r"different config \(schedule.pct_start: 0.25 -> 0.5\)"):
        compose(["data=synthetic", "schedule=onecycle", "schedule.pct_start=0.5"]).cfg.check_resumable(
            c.identity(), tmp_path)
    with pytest.raises(ConfigError, match=r"schedule.name: 'onecycle' -> 'cosine'"):  # another schedule: all compared
        compose(["data=synthetic", "schedule=cosine"]).cfg.check_resumable(c.identity(), tmp_path)


def test_a_name_over_name_max_is_one_error_line_not_a_traceback(tmp_path):
    """A name longer than the file system allows (255 bytes) in the run folder, the data root or evaluate's
    arguments: one line naming it and the limit (each raised "File name too long" as an OSError traceback)."""
    import subprocess
    import sys
    long = tmp_path / ("a" * 300)
    for argv, said in (
            (["train", "data=synthetic", f"hydra.run.dir={long}"], "error: run folder: the name aaaa"),
            (["train", "data=cifar10", f"data.root={long}", f"hydra.run.dir={tmp_path / 'r'}"], "error: data.root: the name aaaa"),
            (["evaluate", str(long)], "error: the run folder: the name aaaa"),
            (["evaluate", str(tmp_path), "--checkpoint", str(long)], "error: --checkpoint: the name aaaa")):
        # a process of its own: `train` sets its process's signal dispositions (ignored warnings, which a job
        # this test process starts later would inherit)
        r = subprocess.run([sys.executable, "-m", "allconv_hpc", *argv], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
        assert r.returncode == 2, (argv, r.stderr)
        err = r.stderr
        assert said in err and "is 300 bytes, over the 255 this file system allows" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_a_run_folder_that_is_a_dangling_link_or_under_a_read_only_sweep_folder_is_named(tmp_path):
    """A link to a folder that is gone (scratch purged) failed at mkdir with "[Errno 17] File exists"; a sweep point
    whose folder cannot be written named hydra.run.dir, which a sweep does not take, as the fix."""
    from allconv_hpc.compose import check_run_dir
    from allconv_hpc.config import ConfigError
    (tmp_path / "run").symlink_to(tmp_path / "purged")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'run'} is a link to {tmp_path / 'purged'}, which does not "
                                          rf"exist \(or loops\); make that folder, or give another hydra.run.dir"):
        check_run_dir(tmp_path / "run")
    (tmp_path / "purged").mkdir()
    check_run_dir(tmp_path / "run")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder; give another hydra.sweep.dir"):
        check_run_dir(tmp_path / "afile" / "optim.lr=0.1", "hydra.sweep.dir")


def test_one_option_in_brackets_and_a_list_of_recipes_are_hydras_to_compose():
    assert compose(["data=[synthetic]"]).cfg.data.name == "synthetic"
    assert compose(["data=synthetic", "experiment=[fast]"]).cfg.optim.lr == 0.1


def test_a_run_folder_named_by_the_clock_is_warned_with_the_folder_to_give(tmp_path, monkeypatch):
    """hydra.run.dir=runs/${now:...} is another folder at each start: a rerun, or a plain sbatch script's requeue,
    starts over. Warned (by train and by submit) with the folder to give to resume; a fixed folder is not."""
    from allconv_hpc.compose import train_warnings
    monkeypatch.chdir(tmp_path)
    c = compose(["data=synthetic", "hydra.run.dir=runs/x-${now:%Y%m%d}"])
    assert c.run_dir.parent == tmp_path / "runs" and c.run_dir.name.startswith("x-20")
    assert train_warnings(c, c.overrides, "one process") == [
        f"hydra.run.dir=runs/x-${{now:%Y%m%d}} names a new folder at each start ({c.run_dir} this time): the same "
        f"command run again starts over instead of resuming; give hydra.run.dir={c.run_dir} to resume this one"]
    for fixed in (["data=synthetic"], ["data=synthetic", "hydra.run.dir=runs/x-${seed}"]):
        c = compose(fixed)
        assert train_warnings(c, c.overrides, "one process") == [], fixed


def test_a_new_root_for_a_run_started_over_is_not_warned_as_a_resume(tmp_path, monkeypatch):
    """data.root named anew for a run folder that read another: a resume is warned (the same images are expected);
    checkpoint.resume=never starts over, so there is nothing to warn of."""
    from allconv_hpc.compose import pin_data_root, write_hydra_files
    monkeypatch.chdir(tmp_path)
    first = compose(["data.root=/old", "hydra.run.dir=run"])
    pin_data_root(first)
    write_hydra_files(first)
    said = pin_data_root(compose(["data.root=/new", "hydra.run.dir=run"]))
    assert said is not None and said[0] and "is not the /old this run read before" in said[1], said
    assert pin_data_root(compose(["data.root=/new", "hydra.run.dir=run", "checkpoint.resume=never"])) is None


def test_a_data_root_not_found_names_the_root_the_run_read_before(tmp_path, monkeypatch, capsys):
    """A relative data.root typed from another folder on resume (or ALLCONV_DATA set since): the error named only
    the folder not found; it names the recorded root, where the data still is, and how to read it (submit before
    the queue, train before any work). Not where that folder lost its data too."""
    import torch

    from allconv_hpc import data
    from allconv_hpc.compose import pin_data_root, write_hydra_files
    from allconv_hpc.config import shell_word
    from allconv_hpc.launcher import submit_main
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)  # noqa: E731
    data.write_cifar(tmp_path / "data", "cifar10", images(20), torch.arange(20) % 10, images(10), torch.arange(10),
                     [f"c{i}" for i in range(10)])
    monkeypatch.delenv("ALLCONV_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    first = compose(["data=cifar10", "data.root=data", "hydra.run.dir=run"])
    pin_data_root(first)
    write_hydra_files(first)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    recorded = f"this run read its images from {tmp_path / 'data'} before: "
    typed = (f"{recorded}data.root={shell_word(str(tmp_path / 'data'))} reads them there (a relative data.root is "
             f"read from the current folder, here {tmp_path / 'elsewhere'})")
    ov = ["data=cifar10", "data.root=data", f"hydra.run.dir={tmp_path / 'run'}"]
    assert submit_main(["--dry-run", "cluster=local", *ov]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'elsewhere' / 'data'}" in err and f"network; {typed}" in err, err
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", *ov], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and typed in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "elsewhere" / "data").exists()
    # not typed: ALLCONV_DATA outranks the recorded root, so "no data.root" would fail the same way
    monkeypatch.setenv("ALLCONV_DATA", str(tmp_path / "nodata"))
    assert submit_main(["--dry-run", "cluster=local", *ov[:1], *ov[2:]]) == 2
    assert (f"{recorded}unset ALLCONV_DATA (it names {tmp_path / 'nodata'}), or give data.root="
            f"{shell_word(str(tmp_path / 'data'))}, to read them there") in capsys.readouterr().err
    monkeypatch.delenv("ALLCONV_DATA")
    # the recorded folder without its data: nothing to point at
    shutil.rmtree(tmp_path / "data" / "cifar-10-batches-py")
    assert submit_main(["--dry-run", "cluster=local", *ov]) == 2
    assert "this run read its images from" not in capsys.readouterr().err


def test_the_same_data_folder_spelled_otherwise_is_not_warned_and_the_environment_is_named(tmp_path, monkeypatch):
    """/a/work/../cifar and /a/other/../cifar are one folder (recorded as /a/cifar, links kept as given); a new
    root from ALLCONV_DATA is said as ALLCONV_DATA=..., not as a data.root=... that was never typed."""
    from allconv_hpc.compose import pin_data_root, recorded_data_root, write_hydra_files
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALLCONV_DATA", raising=False)
    first = compose(["data.root=/a/work/../cifar", "hydra.run.dir=run"])
    assert pin_data_root(first) is None and first.cfg.data.root == "/a/cifar"
    write_hydra_files(first)
    assert recorded_data_root(tmp_path / "run") == "/a/cifar"
    again = compose(["data.root=/a/other/../cifar", "hydra.run.dir=run"])
    assert pin_data_root(again) is None and again.cfg.data.root == "/a/cifar"
    monkeypatch.setenv("ALLCONV_DATA", "/a/./cifar/")
    assert pin_data_root(compose(["hydra.run.dir=run"])) is None
    monkeypatch.setenv("ALLCONV_DATA", "/b/cifar")
    said = pin_data_root(compose(["hydra.run.dir=run"]))
    assert said == (True, "ALLCONV_DATA=/b/cifar is not the /a/cifar this run read before: reading /b/cifar (a resume "
                          "may move its data: it checks the images are the ones it trained on)"), said
    said = pin_data_root(compose(["data.root=/c/x/../cifar", "hydra.run.dir=run"]))  # typed: said as typed
    assert said is not None and said[1].startswith("data.root=/c/cifar is not the /a/cifar this run read before"), said
    # a link to the folder the run read is that folder: read as given, not warned of (a real folder and link here)
    real, link = tmp_path / "cifar", tmp_path / "my data"
    real.mkdir()
    link.symlink_to(real)
    first = compose([f"data.root={real}", "hydra.run.dir=run2"])
    pin_data_root(first)
    write_hydra_files(first)
    again = compose([f"data.root={link}", "hydra.run.dir=run2"])
    assert pin_data_root(again) is None and again.cfg.data.root == str(link)
    monkeypatch.setenv("ALLCONV_DATA", str(link))
    again = compose(["hydra.run.dir=run2"])
    assert pin_data_root(again) is None and again.cfg.data.root == str(link)


def _cluster_error(*overrides: str, cluster: str = "slurm") -> str:
    """What submit's check of the cluster profile says of these overrides (nothing is submitted)."""
    from allconv_hpc import resources
    c = compose([f"cluster={cluster}", "data=synthetic", *overrides])
    with pytest.raises(ConfigError) as e:
        resources.validate_cluster(c.cluster, c.cfg)
    return str(e.value)


@pytest.mark.parametrize("lead,limit,above", [(200, 3, 3), (180, 3, 3), (61, 1, 1)])
def test_a_signal_lead_past_the_time_limit_names_a_whole_number_of_minutes(lead, limit, above):
    """cluster.timeout_min is an integer: the bound to raise it above is one too (was "above 3.33333" for 200 s),
    and the next integer is long enough."""
    from allconv_hpc import resources
    msg = _cluster_error(f"cluster.signal_lead_s={lead}", f"cluster.timeout_min={limit}")
    assert msg.endswith(f"or raise cluster.timeout_min above {above}"), msg
    c = compose(["cluster=slurm", "data=synthetic", f"cluster.signal_lead_s={lead}",
                 f"cluster.timeout_min={above + 1}"])
    resources.validate_cluster(c.cluster, c.cfg)


@pytest.mark.parametrize("sent", ["KILL", "SIGSTOP"])
def test_an_uncatchable_cluster_signal_is_refused_as_such(sent):
    """cluster.signal=KILL was "differs from checkpoint.signal=USR2 ... make them equal", which no value can: KILL
    and STOP cannot be caught, so checkpoint.signal refuses them too."""
    assert _cluster_error(f"cluster.signal={sent}") == (
        f"cluster.signal={sent} cannot be caught, so no checkpoint could follow it; send the signal checkpoint.signal "
        f"catches (one of USR1, USR2, HUP, XCPU; now USR2): cluster.signal=USR2")
    assert _cluster_error("cluster.signal=KILL", "checkpoint.signal=HUP").endswith("now HUP): cluster.signal=HUP")
    for cluster, sender in (("slurm", "Slurm"), ("local", "its controller")):  # a local job has no Slurm
        assert _cluster_error("cluster.signal=HUP", cluster=cluster).endswith(
            f"the job would not catch the signal {sender} sends; make them equal")


def test_a_number_from_an_env_variable_is_refused_with_the_way_to_decode_it(monkeypatch, tmp_path):
    """${oc.env:VAR} gives a string, even "10": the refusal says so and how to give the number, and the way it
    gives works (the nested interpolation, unquoted, is a parse error that says to quote it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPOCHS", "10")
    with pytest.raises(ConfigError, match=re.escape(
            "trainer.epochs='10' must be an int (a whole number; here a string: give it unquoted, trainer.epochs=10; "
            "one from ${oc.env:VAR} is decoded by 'trainer.epochs=\"${oc.decode:${oc.env:VAR}}\"', or given by the "
            "shell, trainer.epochs=$VAR)")):
        compose(["data=synthetic", "trainer.epochs=${oc.env:EPOCHS}"])
    with pytest.raises(ConfigError, match=re.escape(
            "an interpolation inside another needs quotes: 'trainer.epochs=\"${oc.decode:${oc.env:EPOCHS}}\"'")):
        compose(["data=synthetic", "trainer.epochs=${oc.decode:${oc.env:EPOCHS}}"])
    assert compose(["data=synthetic", 'trainer.epochs="${oc.decode:${oc.env:EPOCHS}}"']).cfg.trainer.epochs == 10
    with pytest.raises(ConfigError) as e:  # a string that is no number: no such advice
        compose(["data=synthetic", "trainer.epochs=ten"])
    assert str(e.value) == "trainer.epochs='ten' must be an int (a whole number)"


# override lists over groups, values, lists, dicts, additions, deletions, hydra keys and errors, in any order
_COMPOSE_CASES = [
    [], ["seed=3"], ["model=allcnn_b", "optim.lr=0.1"], ["optim.lr=0.1", "model=model_a", "optim.lr=0.2"],
    ["experiment=fast", "trainer.epochs=5"], ["trainer.epochs=5", "experiment=fast", "model=allcnn_a"],
    ["data=synthetic", "schedule.milestones=[1,2]"], ["schedule.milestones.0=5"], ["+extra=1", "seed=2"],
    ["~wandb.tags"], ["++seed=4"], ["model={width: 0.5}"], ["hydra.run.dir=x/${seed}", "seed=9"],
    ["seed=${oc.env:HOME}"], ["hydra.sweep.dir=s", "data=cifar100", "data.val_size=10"], ["cluster=slurm", "cluster.nodes=2"],
    ["hydra.job.env_copy=[HOME]", "seed=5"], ["experiment=seed_keras", "model.width=0.5", "hydra.run.dir=r"],
    ["hydra={job: {env_copy: [HOME]}, runtime: {version: x}}"], ["++hydra.job.env_copy=[HOME]"],
    ["hydra.overrides.task=[a]", "seed=1"], ["hydra/job_logging=disabled", "seed=2"],
]
_COMPOSE_ERRORS = [  # Hydra refuses these
    ["seed=1,2"], ["nokey=1"], ["model=nope", "seed=1"], ["seed=1", "optim.nokey=2"], ["schedule.milestones.x=1"],
    ["+seed=1"], ["~nokey"], ["~wandb.group"], ["data=null"],  # the last but one: Hydra deletes no null
]


@pytest.mark.parametrize("overrides", _COMPOSE_CASES + _COMPOSE_ERRORS, ids=" ".join)
def test_a_sweep_points_config_is_hydras_own(overrides, monkeypatch, tmp_path):
    """compose keeps the config of the overrides that pick files and applies the values to a copy (a sweep's points
    share their groups): the result, or the error, is what Hydra's compose gives, twice in a row, in another
    folder too."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from allconv_hpc.compose import CONFIG_MODULE, _BASES, _hydra_config

    def composed(how):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(CONFIG_MODULE, version_base=None):
                return OmegaConf.to_container(how(), resolve=False)
        except Exception as e:  # noqa: BLE001 - the same error is the expected outcome
            return (type(e), str(e))
        finally:
            GlobalHydra.instance().clear()

    _BASES.clear()
    for folder in (Path.cwd(), tmp_path):
        monkeypatch.chdir(folder)
        hydras = composed(lambda: hydra_compose("config", overrides=list(overrides), return_hydra_config=True))
        # a config where one is expected, an error where Hydra refuses: not the same failure on both sides
        assert isinstance(hydras, dict if overrides in _COMPOSE_CASES else tuple), hydras
        for _ in range(2):  # the first composes the base, the second copies it
            assert composed(lambda: _hydra_config(list(overrides), hydra_compose)) == hydras
    if overrides in (["seed=3"], ["~wandb.tags"]):
        assert list(_BASES) == [()]  # values alone: nothing composed but the defaults


def test_a_dependencys_any_of_list_is_a_safe_sbatch_value_and_nothing_else_is():
    """`?` (any one of the dependencies) is Slurm's own syntax, read by sbatch from its #SBATCH line; in another
    option, or with what a shell acts on, a value is refused."""
    from allconv_hpc.resources import check_additional_parameters
    check_additional_parameters({"dependency": "afterok:12?afterany:13_2"})
    for bad in ({"comment": "a?b"}, {"dependency": "afterok:$(id)"}, {"dependency": "afterok:1;x"}):
        with pytest.raises(ConfigError, match=r"is not a safe sbatch value: use true \(a flag\) or only letters"):
            check_additional_parameters(bad)
