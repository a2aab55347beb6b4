#!/usr/bin/env bash
cd /work/main
for pp in channel gcn_zca; do
  /usr/bin/time -v .venv/bin/allconv-hpc train experiment=fast model.width=0.25 trainer.epochs=15 data.root=/tmp/cifar \
    data.preprocess=$pp wandb.mode=disabled trainer.progress=log hydra.run.dir=/tmp/proxy/$pp > /tmp/proxy/$pp.out 2>&1
done
echo done > /tmp/proxy/DONE
