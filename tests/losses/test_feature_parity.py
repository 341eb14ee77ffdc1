"""Parity of the feature and relation losses with their authors' reference code.

Each reference is the formula of the cited file, transcribed here in PyTorch (CPU, float64)
with its published defaults; kdjax's default call (the registered term, or the function
where the term needs a training split) must give the same value and the same gradients to
1e-6 in float64. "The same value" is the reference's batch value against the mean over
examples of kdjax's per-example values (or kdjax's batch-level scalar).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional

from kdjax.losses import crd  # noqa: E402
from kdjax.losses import ofa  # noqa: E402
from kdjax.losses import registry  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-9)


@pytest.fixture(autouse=True)
def float64_highest():
  """float64 everywhere, and full-precision matmuls (TF32 on GPUs would miss 1e-6)."""
  with jax.enable_x64(True), jax.default_matmul_precision('highest'):
    yield


def rand(seed, shape, scale=1.0):
  return np.random.default_rng(seed).standard_normal(shape) * scale


def nchw(x):
  return torch.tensor(np.transpose(np.asarray(x), (0, 3, 1, 2)), dtype=torch.float64,
                      requires_grad=True)


def to_nhwc(g):
  return np.transpose(g.detach().numpy(), (0, 2, 3, 1))


def f64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def term_value(name, options, params, inputs):
  """The registered term's value, reduced as the objective does (mean over the valid
  examples; kept in float64, which the objective's float32 reduction would not)."""
  term = registry.get(name).factory(**options)
  value, _ = term.apply(params, {}, inputs)
  where = inputs.get('where')
  if where is None:
    return jnp.mean(value)
  return jnp.sum(jnp.where(where, value, 0.0)) / jnp.sum(where)


def with_garbage(x, row):
  """``x`` with example ``row`` set to NaN: a masked example must not leak into the rest."""
  x = np.array(x, copy=True)
  x[row] = np.nan
  return x


def random_like(init, seed):
  """Random float64 params of the structure ``init(key)`` returns (traced, never compiled:
  the parity holds for any params, and eager inits cost seconds of dispatch)."""
  shapes = jax.eval_shape(init, jax.random.key(0))
  flat, tree = jax.tree.flatten(shapes)
  return jax.tree.unflatten(tree, [jnp.asarray(rand(seed + i, x.shape, 0.3))
                                   for i, x in enumerate(flat)])


# =========================================================================== AT
# megvii-research/mdistiller mdistiller/distillers/AT.py (single_stage_at_loss, at_loss) and
# HobbitLong/RepDistiller distiller_zoo/AT.py: map = normalize(mean_c f^p) over the
# flattened positions; the larger feature is adaptive-average-pooled to the smaller (H, H)
# first; loss = mean over batch and positions of the squared difference, summed over stages.

def torch_at(pairs, p=2):
  total = 0.0
  for f_s, f_t in pairs:
    hs, ht = f_s.shape[2], f_t.shape[2]
    if hs > ht:
      f_s = F.adaptive_avg_pool2d(f_s, (ht, ht))
    elif hs < ht:
      f_t = F.adaptive_avg_pool2d(f_t, (hs, hs))
    at = lambda f: F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))
    total = total + (at(f_s) - at(f_t)).pow(2).mean()
  return total


def test_attention_transfer_default_equals_reference():
  student = {'stage1': rand(0, (3, 8, 8, 3)), 'stage2': rand(1, (3, 4, 4, 5)),
             'stage3': rand(2, (3, 3, 3, 4))}
  teacher = {'stage1': rand(3, (3, 4, 4, 6)), 'stage2': rand(4, (3, 4, 4, 2)),
             'stage3': rand(5, (3, 6, 6, 7))}
  ts = {k: nchw(v) for k, v in student.items()}
  want = torch_at([(ts[k], nchw(teacher[k])) for k in ('stage1', 'stage2', 'stage3')])
  want.backward()

  def loss(s):
    inputs = {'student_features': s, 'teacher_features': f64(teacher)}
    return term_value('attention_transfer', {}, {}, inputs)

  got, grads = jax.jit(jax.value_and_grad(loss))(f64(student))
  np.testing.assert_allclose(got, want.item(), **TOL)
  for k in student:
    np.testing.assert_allclose(grads[k], to_nhwc(ts[k].grad), **TOL)


# =========================================================================== PKT
# HobbitLong/RepDistiller distiller_zoo/PKT.py (cosine_similarity_loss, from the authors'
# passalis/probabilistic_kt): x / (|x| + eps), kernel (cos + 1) / 2 with self-pairs, rows
# normalized, mean over all n^2 entries of p_t log((p_t + eps) / (p_s + eps)), eps = 1e-7.

def torch_pkt(s, t, eps=1e-7):
  def cond(x):
    x = x / (torch.sqrt((x ** 2).sum(1, keepdim=True)) + eps)
    k = (x @ x.T + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)
  ps, pt = cond(s), cond(t)
  return torch.mean(pt * torch.log((pt + eps) / (ps + eps)))


def test_pkt_default_equals_reference():
  s, t = rand(0, (6, 5)), rand(1, (6, 9))
  ts = torch.tensor(s, requires_grad=True)
  want = torch_pkt(ts, torch.tensor(t))
  want.backward()

  def loss(x):
    inputs = {'student_features': {'penultimate': x},
              'teacher_features': {'penultimate': jnp.asarray(t)}}
    return term_value('pkt', {}, {}, inputs)

  got, g = jax.jit(jax.value_and_grad(loss))(jnp.asarray(s))
  np.testing.assert_allclose(got, want.item(), **TOL)
  np.testing.assert_allclose(g, ts.grad.numpy(), **TOL)


# =========================================================================== FitNet
# megvii-research/mdistiller mdistiller/distillers/_common.py (ConvReg) and FitNet.py:
# conv chosen by the heights (3x3 stride 2 pad 1 for a student twice as large, 4x4 stride-2
# transposed conv pad 1 for half, else a valid conv of kernel (1 + Hs - Ht, 1 + Ws - Wt)),
# BatchNorm2d (train mode), ReLU; loss = F.mse_loss(regressed, teacher).

def torch_conv_reg(p, x, s_h, t_h):
  """``p``: torch leaves in kdjax's layouts (kernel HWIO, or [kh, kw, in, out] transposed)."""
  if s_h == 2 * t_h:
    h = F.conv2d(x, p['kernel'].permute(3, 2, 0, 1), p['bias'], stride=2, padding=1)
  elif 2 * s_h == t_h:
    h = F.conv_transpose2d(x, p['kernel'].permute(2, 3, 0, 1), p['bias'], stride=2, padding=1)
  else:
    h = F.conv2d(x, p['kernel'].permute(3, 2, 0, 1), p['bias'])
  h = F.batch_norm(h, None, None, p['scale'], p['shift'], training=True, eps=1e-5)
  return F.relu(h)


@pytest.mark.parametrize('s_shape,t_shape', [
    ((3, 8, 8, 4), (3, 4, 4, 6)),          # stride-2 conv
    ((3, 3, 3, 4), (3, 6, 6, 5)),          # transposed conv
    ((3, 5, 6, 4), (3, 4, 4, 3)),          # valid conv, kernel 2x3
])
def test_fitnet_default_equals_reference(s_shape, t_shape):
  s, t = rand(0, s_shape), rand(1, t_shape)
  inputs = {'student_features': {'stage1': jnp.asarray(s)},
            'teacher_features': {'stage1': jnp.asarray(t)}}
  params = random_like(lambda key: registry.get('fitnet').factory().init(key, inputs)[0], 2)

  @jax.jit
  def run(p, x, where):
    loss = lambda p, x: term_value('fitnet', {}, p, dict(
        inputs, student_features={'stage1': x}, where=where))
    return jax.value_and_grad(loss, argnums=(0, 1))(p, x)

  # All examples; then example 1 masked (NaN features): the reference on the other two
  # (batch-norm statistics included).
  for where in (np.ones(3, bool), np.array([True, False, True])):
    leaf = lambda x: torch.tensor(np.asarray(x), requires_grad=True)
    tp = {'kernel': leaf(params['conv']['kernel']), 'bias': leaf(params['conv']['bias']),
          'scale': leaf(params['bn']['scale']), 'shift': leaf(params['bn']['bias'])}
    ts = nchw(s[where])
    want = F.mse_loss(torch_conv_reg(tp, ts, s_shape[1], t_shape[1]),
                      torch.tensor(np.transpose(t[where], (0, 3, 1, 2))))
    want.backward()
    x = s if where.all() else with_garbage(s, 1)
    got, (gp, gs) = run(params, jnp.asarray(x), where)
    np.testing.assert_allclose(got, want.item(), **TOL)
    np.testing.assert_allclose(gs[where], to_nhwc(ts.grad), **TOL)
    assert np.all(np.asarray(gs[~where]) == 0.0)
    np.testing.assert_allclose(gp['conv']['kernel'], tp['kernel'].grad.numpy(), **TOL)
    np.testing.assert_allclose(gp['conv']['bias'], tp['bias'].grad.numpy(), **TOL)
    np.testing.assert_allclose(gp['bn']['scale'], tp['scale'].grad.numpy(), **TOL)
    np.testing.assert_allclose(gp['bn']['bias'], tp['shift'].grad.numpy(), **TOL)


# =========================================================================== CRD
# HobbitLong/RepDistiller crd/criterion.py (CRDLoss, ContrastLoss, Embed) and crd/memory.py
# (ContrastMemory): embeddings = l2-normalized linear heads; rows [positive, negatives] of
# the *other* side's memory bank scored exp(<m, v> / T); Z = mean(out) * n_data set on the
# first batch and kept; out / Z; NCE: -(sum log(P/(P + K/N + eps)) + sum log((K/N)/(P + K/N
# + eps))) / batch, eps = 1e-7, for the student and the teacher anchors, summed; then each
# bank's rows move to normalize(m * row + (1 - m) * v).

def torch_crd_step(p, mem, f_s, f_t, idx, contrast, n_data, temp=0.07, momentum=0.5):
  embed = lambda x, q: F.normalize(x.reshape(x.shape[0], -1) @ q['kernel'] + q['bias'], dim=1,
                                   eps=0.0)
  v1, v2 = embed(f_s, p['student']), embed(f_t, p['teacher'])
  full = torch.cat([idx[:, None], contrast], dim=1)
  out_v1 = torch.exp(torch.bmm(mem['teacher'][full].detach(), v1[:, :, None])[..., 0] / temp)
  out_v2 = torch.exp(torch.bmm(mem['student'][full].detach(), v2[:, :, None])[..., 0] / temp)
  z = dict(mem['z'])
  if z['student'] < 0:
    z['student'] = out_v1.mean().item() * n_data
  if z['teacher'] < 0:
    z['teacher'] = out_v2.mean().item() * n_data
  out_v1, out_v2 = out_v1 / z['student'], out_v2 / z['teacher']

  def contrast_loss(x):
    k = x.shape[1] - 1
    noise = k / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + 1e-7))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + 1e-7))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

  new = {'z': z}
  with torch.no_grad():
    for side, v in (('student', v1), ('teacher', v2)):
      rows = mem[side][idx] * momentum + v * (1 - momentum)
      bank = mem[side].clone()
      bank[idx] = rows / rows.pow(2).sum(1, keepdim=True).sqrt()
      new[side] = bank
  return contrast_loss(out_v1) + contrast_loss(out_v2), new


def test_crd_nce_equals_reference_over_two_steps():
  n_data, k, dim, b = 20, 6, 4, 5
  s, t = rand(0, (b, 7)), rand(1, (b, 3, 3))
  params = random_like(lambda key: crd.crd_init(key, s.shape, t.shape, dim), 2)
  unset = jnp.asarray(-1.0)                      # Z is set by the first batch
  mem = crd.MemoryState(jnp.asarray(rand(8, (n_data, dim), 0.5)),
                        jnp.asarray(rand(9, (n_data, dim), 0.5)), unset, unset,
                        jnp.zeros((2,), jnp.uint32))
  ids = [np.array([4, 0, 17, 9, 12]), np.array([1, 4, 19, 3, 8])]
  negs = [np.random.default_rng(i).integers(0, n_data, (b, k)) for i in (2, 3)]
  tmem = {'student': torch.tensor(np.asarray(mem.student)),
          'teacher': torch.tensor(np.asarray(mem.teacher)),
          'z': {'student': -1.0, 'teacher': -1.0}}
  leaf = lambda x: torch.tensor(np.asarray(x), requires_grad=True)

  @jax.jit
  def run(p, mem, x, xt, ids, negs, where):
    loss = lambda p, x: crd.crd_nce_loss(p, mem, x, xt, ids, negs, where=where)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)

  # Two steps (the first sets Z), the second with example 3 masked (NaN features): the
  # reference on the other four, whose bank rows alone are written.
  for step, where in ((0, np.ones(b, bool)), (1, np.arange(b) != 3)):
    xs, xt = s * (1 + step), t - step                  # a different batch each step
    tp = jax.tree.map(leaf, params)
    ts = torch.tensor(xs[where], requires_grad=True)
    want, tmem = torch_crd_step(tp, tmem, ts, torch.tensor(xt[where]),
                                torch.tensor(ids[step][where]),
                                torch.tensor(negs[step][where]), n_data)
    want.backward()
    x = xs if where.all() else with_garbage(xs, 3)
    (got, new), (gp, gs) = run(params, mem, jnp.asarray(x), jnp.asarray(xt), ids[step],
                               negs[step], where)
    np.testing.assert_allclose(got, want.item(), **TOL)
    np.testing.assert_allclose(gs[where], ts.grad.numpy(), **TOL)
    assert np.all(np.asarray(gs[~where]) == 0.0)
    for side in ('student', 'teacher'):
      for name in ('kernel', 'bias'):
        np.testing.assert_allclose(gp[side][name], tp[side][name].grad.numpy(), **TOL)
    np.testing.assert_allclose(new.z_student, tmem['z']['student'], **TOL)
    np.testing.assert_allclose(new.z_teacher, tmem['z']['teacher'], **TOL)
    np.testing.assert_allclose(new.student, tmem['student'].numpy(), **TOL)
    np.testing.assert_allclose(new.teacher, tmem['teacher'].numpy(), **TOL)
    mem = new


# =========================================================================== OFA
# Hao840/OFAKD distillers/ofa.py (ofa_loss; the CNN and ViT projectors) and
# distillers/utils.py (SepConv, PatchMerging); timm 0.6 Block (its requirements.txt).
# loss = mean over the batch of -sum_c ((p_t + onehot)^eps - onehot) log p_s, for every
# stage's projector output and for the student's logits, summed.

def torch_ofa_loss(zs, zt, labels, eps=1.0, temperature=1.0):
  ps = F.softmax(zs / temperature, dim=1)
  pt = F.softmax(zt / temperature, dim=1)
  mask = F.one_hot(labels, zs.shape[1]).to(zs.dtype)
  return torch.sum(-((pt + mask) ** eps - mask) * torch.log(ps), dim=-1).mean()


def leaves(tree):
  return jax.tree.map(lambda x: torch.tensor(np.asarray(x), requires_grad=True), tree)


def torch_conv(p, x, stride=1, padding=0, groups=1):
  return F.conv2d(x, p['kernel'].permute(3, 2, 0, 1), p.get('bias'), stride=stride,
                  padding=padding, groups=groups)


def torch_bn(p, x):
  return F.batch_norm(x, None, None, p['scale'], p['bias'], training=True, eps=1e-5)


def torch_sepconv(p, x):
  c = x.shape[1]
  h = torch_conv(p['dw1'], x, stride=2, padding=1, groups=c)
  h = F.relu(torch_bn(p['bn1'], torch_conv(p['pw1'], h)))
  h = torch_conv(p['dw2'], h, padding=1, groups=c)
  return F.relu(torch_bn(p['bn2'], torch_conv(p['pw2'], h)))


def torch_cnn_projector(p, x):
  if 'conv' in p:
    x = torch_conv(p['conv'], x)
  for block in p.get('sepconv', []):
    x = torch_sepconv(block, x)
  return F.adaptive_avg_pool2d(x, 1).flatten(1) @ p['fc']['kernel'] + p['fc']['bias']


def torch_linear(p, x):
  y = x @ p['kernel']
  return y + p['bias'] if 'bias' in p else y


def torch_block(p, x, heads=4):
  b, n, d = x.shape
  ln = lambda q, v: F.layer_norm(v, (d,), q['scale'], q['bias'], eps=1e-5)
  qkv = torch_linear(p['qkv'], ln(p['norm1'], x)).reshape(b, n, 3, heads, d // heads)
  q, k, v = qkv.permute(2, 0, 3, 1, 4)
  att = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
  x = x + torch_linear(p['proj'], (att @ v).transpose(1, 2).reshape(b, n, d))
  return x + torch_linear(p['fc2'], F.gelu(torch_linear(p['fc1'], ln(p['norm2'], x))))


def torch_merge(p, x, grid, gelu):
  b, _, c = x.shape
  x = x.reshape(b, grid, grid, c)
  x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
  x = F.layer_norm(x.reshape(b, -1, 4 * c), (4 * c,), p['norm']['scale'], p['norm']['bias'])
  x = x @ p['reduction']['kernel']
  return F.gelu(x) if gelu else x


def torch_vit_projector(p, x, tokens=1):
  cls, patches = x[:, :tokens], x[:, tokens:]
  grid = int(round(patches.shape[1] ** 0.5))
  merges = len(p['merge'])
  for i, merge in enumerate(p['merge']):
    patches = torch_merge(merge, patches, grid, gelu=i == 0 or i != merges - 1)
    grid //= 2
  x = torch.cat([cls, patches], 1) if tokens else patches
  for block in p['blocks']:
    x = torch_block(block, x)
  pooled = x[:, 0] if tokens else x.mean(1)
  return torch_linear(p['fc'], pooled)




def test_ofa_default_equals_reference_cnn():
  b, classes = 4, 5
  student = {'stage1': rand(0, (b, 8, 8, 3)), 'stage2': rand(1, (b, 4, 4, 6)),
             'penultimate': rand(2, (b, 6))}
  zt, zs = rand(4, (b, classes)), rand(5, (b, classes))
  labels = np.array([0, 3, 1, 4])
  inputs = {'student_features': f64(student),
            'teacher_features': {'penultimate': jnp.asarray(rand(3, (b, 10)))},
            'teacher_logits': jnp.asarray(zt), 'student_logits': jnp.asarray(zs),
            'labels': jnp.asarray(labels)}
  params = random_like(lambda key: registry.get('ofa').factory().init(key, inputs)[0], 10)
  # The reference's projectors for stages 1-2 of 2: one SepConv to max(6, 10), a 1x1 conv.
  assert len(params['stage1']['sepconv']) == 1 and 'conv' in params['stage2']

  @jax.jit
  def run(p, feats, zs, where):
    loss = lambda p, feats, zs: term_value('ofa', {}, p, dict(
        inputs, student_features=feats, student_logits=zs, where=where))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(p, feats, zs)

  # All examples; then example 2 masked (NaN features): the reference on the other three
  # (the projectors' batch-norm statistics included).
  for where in (np.ones(b, bool), np.arange(b) != 2):
    tp = leaves(params)
    tf = {k: nchw(v[where]) for k, v in student.items() if k != 'penultimate'}
    tzs = torch.tensor(zs[where], requires_grad=True)
    tzt, tlabels = torch.tensor(zt[where]), torch.tensor(labels[where])
    want = torch_ofa_loss(tzs, tzt, tlabels)
    for name in ('stage1', 'stage2'):
      want = want + torch_ofa_loss(torch_cnn_projector(tp[name], tf[name]), tzt, tlabels)
    want.backward()
    feats = {k: jnp.asarray(v if where.all() else with_garbage(v, 2)) for k, v in student.items()}
    got, (gp, gf, gz) = run(params, feats, jnp.asarray(zs), where)
    np.testing.assert_allclose(got, want.item(), **TOL)
    np.testing.assert_allclose(gz[where], tzs.grad.numpy(), **TOL)
    for name in ('stage1', 'stage2'):
      np.testing.assert_allclose(gf[name][where], to_nhwc(tf[name].grad), **TOL)
      assert np.all(np.asarray(gf[name][~where]) == 0.0)
    jax.tree.map(lambda g, t: np.testing.assert_allclose(g, t.grad.numpy(), **TOL), gp, tp)


def test_ofa_vit_projector_equals_reference():
  b, classes, tokens = 2, 3, 1
  x = rand(0, (b, tokens + 4 * 4, 8))
  # A 4x4 grid merged down to 1x1 (two patch mergings: GELU, then none), two blocks.
  params = random_like(lambda key: ofa.ofa_projector_init(
      key, x.shape, classes, projector='vit', depth=2, num_tokens=tokens, final_grid=1), 20)
  assert len(params['merge']) == 2 and len(params['blocks']) == 2
  zt, labels = rand(1, (b, classes)), np.array([2, 0])
  tp, tx = leaves(params), torch.tensor(x, requires_grad=True)
  want = torch_ofa_loss(torch_vit_projector(tp, tx, tokens), torch.tensor(zt),
                        torch.tensor(labels), eps=1.4)
  want.backward()

  def loss(p, x):
    z = ofa.ofa_projector_apply(p, x, num_tokens=tokens)
    return jnp.mean(ofa.ofa_loss(z, jnp.asarray(zt), labels, eps=1.4))

  got, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
  np.testing.assert_allclose(got, want.item(), **TOL)
  np.testing.assert_allclose(gx, tx.grad.numpy(), **TOL)
  jax.tree.map(lambda g, t: np.testing.assert_allclose(g, t.grad.numpy(), **TOL), gp, tp)
