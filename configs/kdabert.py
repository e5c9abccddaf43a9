"""KDABert (the seed's variant): adversarial distillation of hidden states instead of an MSE.

Student loss `0.5 T^2 KL (T = 2) + 0.5 CE + lambda_adv * sum_l L_G(D_l(h_s W_h))`: KD and CE as in
configs/kd.py, so the comparison with kd isolates the adversarial term; no hidden-state MSE
(gamma = 0). One discriminator per TinyBERT-mapped layer (uniform map, 3 -> 6: m <-> 2m) sees
`[mean-pool ; CLS]` of teacher and (projected) student hidden states; they alternate with the
student (n_D D steps, then one student step). lambda_adv = 0.1, 0 for the first 10 % of the
stage, then ramped in over the next 10 %. See METHODS.md section 6 and kdjax/methods/kdabert.py.

The argument is `SETTING[,LOSS]`: the setting (default tenth_size: 3 x 168 student, projection
to the teacher's 384) and the discriminator loss (bce, the default; hinge; wgan_gp), which picks
the discriminator defaults (`kdjax.methods.kdabert.discriminator_config`).

  kdjax distill --config configs/kdabert.py --workdir runs/kdabert
  kdjax distill --config configs/kdabert.py:half_depth,wgan_gp --workdir runs/kdabert_wgan
  kdjax distill --config configs/kdabert.py --config.distill.loss.adversarial=0.3 \
      --config.discriminator.lr=1e-4 --workdir runs/kdabert_l03
"""

from kdjax import recipes


def get_config(arg=None):
    return recipes.kdabert_config(arg, hidden_mse=0.0)
