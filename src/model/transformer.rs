//! The DPIR transformer: SD3's MMDiT (diffusers `SD3Transformer2DModel`, 0.29.2) plus DPIR's
//! LQ conditioning branch (`control_conv`), injected once after block 0 with adaptive feature
//! alignment (official `models/transformer_sd3_cnext.py`).
//!
//! Weights use the diffusers key names. Computation runs in the dtype of the weights; layer
//! norms, GroupNorm statistics, the alignment statistics and (on CPU) the softmax are computed in
//! at least f32.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::layers::{self, Conv, Gn, Lin};

/// diffusers `SD3Transformer2DModel` config (`transformer/config.json`); unknown keys are
/// ignored, missing keys take diffusers' constructor defaults.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct DpirTransformerConfig {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub out_channels: usize,
    pub pos_embed_max_size: usize,
}

impl Default for DpirTransformerConfig {
    /// diffusers' `__init__` defaults (not SD3-medium; see [`Self::sd3_medium`]).
    fn default() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 18,
            attention_head_dim: 64,
            num_attention_heads: 18,
            joint_attention_dim: 4096,
            caption_projection_dim: 1152,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: 96,
        }
    }
}

impl DpirTransformerConfig {
    /// SD3-medium / real DPIR.
    pub fn sd3_medium() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: 192,
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

const LN_EPS: f64 = 1e-6;
const GN_EPS: f64 = 1e-5;
const ALIGN_EPS: f64 = 1e-9;
fn stats_dtype(dt: DType) -> DType {
    match dt {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

fn norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    layers::layer_norm_modulate(x, shift, scale, LN_EPS)
}

/// diffusers `AdaLayerNormZero`: returns (normed+modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp).
#[derive(Debug, Clone)]
struct AdaLayerNormZero {
    linear: Lin,
}

impl AdaLayerNormZero {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear: layers::linear(dim, 6 * dim, vb.pp("linear"))? })
    }

    fn forward(&self, x: &Tensor, temb_silu: &Tensor) -> Result<[Tensor; 5]> {
        let emb = self.linear.forward(temb_silu)?;
        let c = emb.chunk(6, 1)?;
        let xn = norm_modulate(x, &c[0], &c[1])?;
        Ok([xn, c[2].clone(), c[3].clone(), c[4].clone(), c[5].clone()])
    }
}

/// diffusers `AdaLayerNormContinuous` (layer_norm, no affine): note scale comes before shift.
#[derive(Debug, Clone)]
struct AdaLayerNormContinuous {
    linear: Lin,
}

impl AdaLayerNormContinuous {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear: layers::linear(dim, 2 * dim, vb.pp("linear"))? })
    }

    fn forward(&self, x: &Tensor, temb_silu: &Tensor) -> Result<Tensor> {
        let emb = self.linear.forward(temb_silu)?;
        let c = emb.chunk(2, 1)?;
        norm_modulate(x, &c[1], &c[0])
    }
}

/// diffusers `FeedForward(dim, activation_fn="gelu-approximate")`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Lin,
    proj_out: Lin,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = vb.get_unchecked("net.0.proj.weight")?.dim(0)?;
        Ok(Self {
            proj_in: layers::linear(dim, hidden, vb.pp("net.0.proj"))?,
            proj_out: layers::linear(hidden, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, as torch `GELU(approximate="tanh")`.
        self.proj_out.forward(&self.proj_in.forward_gelu(x)?)
    }
}

/// diffusers `Attention` with `JointAttnProcessor2_0` (image tokens first, then context).
#[derive(Debug, Clone)]
struct JointAttention {
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    add_q: Lin,
    add_k: Lin,
    add_v: Lin,
    to_out: Lin,
    to_add_out: Option<Lin>,
    heads: usize,
    head_dim: usize,
}

impl JointAttention {
    fn new(dim: usize, heads: usize, context_pre_only: bool, vb: VarBuilder) -> Result<Self> {
        let l = |n: &str| layers::linear(dim, dim, vb.pp(n));
        Ok(Self {
            to_q: l("to_q")?,
            to_k: l("to_k")?,
            to_v: l("to_v")?,
            add_q: l("add_q_proj")?,
            add_k: l("add_k_proj")?,
            add_v: l("add_v_proj")?,
            to_out: l("to_out.0")?,
            to_add_out: if context_pre_only { None } else { Some(l("to_add_out")?) },
            heads,
            head_dim: dim / heads,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let n_img = x.dim(1)?;
        let n_ctx = ctx.dim(1)?;
        let q = Tensor::cat(&[self.to_q.forward(x)?, self.add_q.forward(ctx)?], 1)?;
        let k = Tensor::cat(&[self.to_k.forward(x)?, self.add_k.forward(ctx)?], 1)?;
        let v = Tensor::cat(&[self.to_v.forward(x)?, self.add_v.forward(ctx)?], 1)?;
        let out = layers::attention(&q, &k, &v, self.heads, 1.0 / (self.head_dim as f64).sqrt())?; // [B, N, H·D]
        let img = self.to_out.forward(&out.narrow(1, 0, n_img)?.contiguous()?)?;
        let ctx_out = match &self.to_add_out {
            Some(l) => Some(l.forward(&out.narrow(1, n_img, n_ctx)?.contiguous()?)?),
            None => None,
        };
        Ok((img, ctx_out))
    }
}

/// diffusers `JointTransformerBlock`.
#[derive(Debug, Clone)]
struct JointBlock {
    norm1: AdaLayerNormZero,
    norm1_context: ContextNorm,
    attn: JointAttention,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
}

#[derive(Debug, Clone)]
enum ContextNorm {
    Zero(AdaLayerNormZero),
    /// Last block (`context_pre_only`).
    Continuous(AdaLayerNormContinuous),
}

impl JointBlock {
    fn new(dim: usize, heads: usize, context_pre_only: bool, vb: VarBuilder) -> Result<Self> {
        let norm1_context = if context_pre_only {
            ContextNorm::Continuous(AdaLayerNormContinuous::new(dim, vb.pp("norm1_context"))?)
        } else {
            ContextNorm::Zero(AdaLayerNormZero::new(dim, vb.pp("norm1_context"))?)
        };
        Ok(Self {
            norm1: AdaLayerNormZero::new(dim, vb.pp("norm1"))?,
            norm1_context,
            attn: JointAttention::new(dim, heads, context_pre_only, vb.pp("attn"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: if context_pre_only { None } else { Some(FeedForward::new(dim, vb.pp("ff_context"))?) },
        })
    }

    /// Returns (context, hidden); context is `None` after the context-pre-only block.
    fn forward(&self, x: &Tensor, ctx: &Tensor, temb_silu: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let [nx, gate_msa, shift_mlp, scale_mlp, gate_mlp] = self.norm1.forward(x, temb_silu)?;
        let (nctx, cmods) = match &self.norm1_context {
            ContextNorm::Zero(n) => {
                let [nc, g, sh, sc, gm] = n.forward(ctx, temb_silu)?;
                (nc, Some((g, sh, sc, gm)))
            }
            ContextNorm::Continuous(n) => (n.forward(ctx, temb_silu)?, None),
        };
        let (attn, ctx_attn) = self.attn.forward(&nx, &nctx)?;
        let x = layers::add_gated(x, &attn, &gate_msa)?;
        let nx = norm_modulate(&x, &shift_mlp, &scale_mlp)?;
        let x = layers::add_gated(&x, &self.ff.forward(&nx)?, &gate_mlp)?;
        let ctx = match (cmods, ctx_attn, &self.ff_context) {
            (Some((g, sh, sc, gm)), Some(ca), Some(ff)) => {
                let ctx = layers::add_gated(ctx, &ca, &g)?;
                let nc = norm_modulate(&ctx, &sh, &sc)?;
                Some(layers::add_gated(&ctx, &ff.forward(&nc)?, &gm)?)
            }
            _ => None,
        };
        Ok((ctx, x))
    }
}

/// DPIR's LQ branch: Conv3×3 → GN(4) → Conv3×3/2 → GN(8) → Conv3×3 → GN(8), no activations.
#[derive(Debug, Clone)]
struct ControlConv {
    layers: Vec<(Conv, Gn)>,
}

impl ControlConv {
    fn new(vb: VarBuilder) -> Result<Self> {
        // Widths come from the weights (the official code hard-codes 1536 in the last pair).
        let specs = [(0usize, 1usize, 4usize), (2, 2, 8), (4, 1, 8)];
        let mut layers = Vec::with_capacity(3);
        for (idx, stride, groups) in specs {
            let w = vb.get_unchecked(&format!("{idx}.weight"))?;
            let (cout, cin, kh, kw) = w.dims4()?;
            if kh != 3 || kw != 3 {
                candle_core::bail!("control_conv.{idx}: expected a 3x3 kernel, got {kh}x{kw}");
            }
            let b = vb.get(cout, &format!("{idx}.bias"))?;
            let _ = cin;
            let conv = Conv::new(w, Some(b), Conv2dConfig { padding: 1, stride, ..Default::default() })?;
            let gn = layers::group_norm(groups, cout, GN_EPS, vb.pp(idx + 1))?;
            layers.push((conv, gn));
        }
        Ok(Self { layers })
    }

    fn out_channels(&self) -> usize {
        self.layers.last().map(|(c, _)| c.weight().dim(0).unwrap_or(0)).unwrap_or(0)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (conv, gn) in &self.layers {
            x = gn.forward(&conv.forward(&x)?)?;
        }
        Ok(x)
    }
}

#[cfg(feature = "parity")]
pub use debug::DpirDebug;
use debug::DpirDebug as Intermediates;

mod debug {
    use candle_core::Tensor;

    /// Intermediates of one forward pass, named after the fixture's `debug_*` tensors (the parity
    /// tests', `parity` feature).
    #[derive(Debug, Clone)]
    #[cfg_attr(not(feature = "parity"), allow(dead_code))] // read by the parity tests only
    pub struct DpirDebug {
        /// Patch conv + cropped pos-embed, [B, tokens, inner].
        pub patch_embed: Tensor,
        /// Timestep + pooled embedding, [B, inner].
        pub temb: Tensor,
        /// `context_embedder` output, [B, ctx, inner].
        pub context_embedded: Tensor,
        /// `control_conv` output, NCHW (before flattening to tokens).
        pub control_conv_out: Tensor,
        pub block0_out_hidden: Tensor,
        pub block0_out_context: Tensor,
        /// Image stream entering block 1: block-0 output + aligned control tokens.
        pub after_block0_plus_control: Tensor,
    }
}

/// The DPIR transformer (SD3 MMDiT + LQ conditioning branch).
#[derive(Debug, Clone)]
pub struct DpirTransformer {
    cfg: DpirTransformerConfig,
    patch_proj: Conv,
    /// [max, max, inner]
    pos_embed: Tensor,
    t_linear_1: Lin,
    t_linear_2: Lin,
    p_linear_1: Lin,
    p_linear_2: Lin,
    context_embedder: Lin,
    blocks: Vec<JointBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Lin,
    control: ControlConv,
    /// f32 frequencies of diffusers `Timesteps(256, flip_sin_to_cos=True, shift=0)`.
    freqs: Vec<f32>,
    /// The activations' dtype ([`layers::compute_dtype`]).
    dtype: DType,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<DpirTransformer>();
};

/// Timestep sinusoid channel count (diffusers `Timesteps(256, ...)` in SD3).
const TIME_PROJ_DIM: usize = 256;

/// The sinusoid's frequencies as torch computes them: `exp(f32(-ln 10000) · arange(half) / half)`
/// in f32.
fn timestep_freqs() -> Vec<f32> {
    let half = TIME_PROJ_DIM / 2;
    let neg_ln = -(10000f64.ln()) as f32;
    (0..half).map(|i| ((neg_ln * i as f32) / half as f32).exp()).collect()
}

impl DpirTransformer {
    pub fn new(cfg: &DpirTransformerConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.inner_dim();
        let p = cfg.patch_size;
        let patch_proj = {
            let vb = vb.pp("pos_embed.proj");
            let w = vb.get((inner, cfg.in_channels, p, p), "weight")?;
            let b = vb.get(inner, "bias")?;
            Conv::new(w, Some(b), Conv2dConfig { stride: p, ..Default::default() })?
        };
        let m = cfg.pos_embed_max_size;
        let pos_embed = vb.get((1, m * m, inner), "pos_embed.pos_embed")?.reshape((m, m, inner))?;
        let tvb = vb.pp("time_text_embed.timestep_embedder");
        let pvb = vb.pp("time_text_embed.text_embedder");
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                JointBlock::new(
                    inner,
                    cfg.num_attention_heads,
                    i + 1 == cfg.num_layers,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        if cfg.caption_projection_dim != inner {
            candle_core::bail!(
                "caption_projection_dim ({}) must equal the inner dim ({inner})",
                cfg.caption_projection_dim
            );
        }
        let control = ControlConv::new(vb.pp("control_conv"))?;
        if control.out_channels() != inner {
            candle_core::bail!("control_conv output width {} != inner dim {inner}", control.out_channels());
        }
        let freqs = timestep_freqs();
        Ok(Self {
            cfg: cfg.clone(),
            patch_proj,
            pos_embed,
            t_linear_1: layers::linear(TIME_PROJ_DIM, inner, tvb.pp("linear_1"))?,
            t_linear_2: layers::linear(inner, inner, tvb.pp("linear_2"))?,
            p_linear_1: layers::linear(cfg.pooled_projection_dim, inner, pvb.pp("linear_1"))?,
            p_linear_2: layers::linear(inner, inner, pvb.pp("linear_2"))?,
            context_embedder: layers::linear(cfg.joint_attention_dim, inner, vb.pp("context_embedder"))?,
            blocks,
            norm_out: AdaLayerNormContinuous::new(inner, vb.pp("norm_out"))?,
            proj_out: layers::linear(inner, p * p * cfg.out_channels, vb.pp("proj_out"))?,
            control,
            freqs,
            dtype: layers::compute_dtype(vb.dtype(), vb.device()),
        })
    }

    pub fn config(&self) -> &DpirTransformerConfig {
        &self.cfg
    }

    /// The dtype the transformer computes in (inputs are cast to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.proj_out.weight().device()
    }

    /// Check that a latent [B, C, H, W] has even sides within the pos-embed table.
    fn check_latent(&self, x: &Tensor, what: &str) -> Result<(usize, usize, usize)> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels {
            candle_core::bail!("{what}: {c} channels, the transformer expects {}", self.cfg.in_channels);
        }
        if h % p != 0 || w % p != 0 || h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!(
                "{what}: latent size {h}x{w} must be even (image sides multiples of 16); the patch grid \
                 and the stride-2 control branch disagree otherwise"
            );
        }
        let m = self.cfg.pos_embed_max_size;
        if h / p > m || w / p > m {
            candle_core::bail!("{what}: latent {h}x{w} exceeds the position table ({m}x{m} patches); tile the latent");
        }
        Ok((b, h, w))
    }

    /// Patch conv + centre-cropped learned position table: [B, tokens, inner].
    fn patch_embed(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.patch_proj.forward(x)?; // [B, inner, h, w]
        let (_, _, h, w) = y.dims4()?;
        let y = y.flatten_from(2)?.transpose(1, 2)?;
        let m = self.cfg.pos_embed_max_size;
        let (top, left) = ((m - h) / 2, (m - w) / 2);
        let pe = self.pos_embed.narrow(0, top, h)?.narrow(1, left, w)?.reshape((1, h * w, ()))?;
        y.broadcast_add(&pe.to_dtype(y.dtype())?)
    }

    /// Timestep (σ·1000, float) + pooled embedding: [B, inner].
    fn temb(&self, timestep: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let dt = self.dtype();
        let b = pooled.dim(0)?;
        let t = match timestep.rank() {
            0 => timestep.reshape(1)?.broadcast_as(b)?.contiguous()?,
            _ => timestep.flatten_all()?,
        };
        if t.dim(0)? != b {
            candle_core::bail!("timestep has {} values for a batch of {b}", t.dim(0)?);
        }
        // diffusers computes the sinusoid in f32 whatever the model dtype (`timesteps.float()`).
        let freqs = Tensor::new(self.freqs.as_slice(), t.device())?;
        let arg = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
        // flip_sin_to_cos: [cos, sin]
        let proj = Tensor::cat(&[arg.cos()?, arg.sin()?], 1)?.to_dtype(dt)?;
        let te = self.t_linear_2.forward(&self.t_linear_1.forward(&proj)?.silu()?)?;
        let pe = self.p_linear_2.forward(&self.p_linear_1.forward(&pooled.to_dtype(dt)?)?.silu()?)?;
        te + pe
    }

    /// The LQ branch on its own: `control_conv` output, NCHW [B, inner, H/2, W/2]. Constant across
    /// sampling steps, so a sampler can compute it once ([`Self::forward_with_control`]).
    pub fn control_features(&self, controlnet_cond: &Tensor) -> Result<Tensor> {
        self.check_latent(controlnet_cond, "controlnet_cond")?;
        self.control.forward(&controlnet_cond.to_dtype(self.dtype())?)
    }

    /// Full forward pass. `timestep` is a float tensor [B] (σ·1000) or a scalar.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
    ) -> Result<Tensor> {
        let control = self.control_features(controlnet_cond)?;
        self.forward_with_control(hidden_states, &control, encoder_hidden_states, pooled_projections, timestep)
    }

    /// Forward with precomputed [`Self::control_features`].
    pub fn forward_with_control(
        &self,
        hidden_states: &Tensor,
        control_features: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
    ) -> Result<Tensor> {
        Ok(self.run(hidden_states, control_features, encoder_hidden_states, pooled_projections, timestep, false)?.0)
    }

    /// Forward that also returns the intermediates (for parity checks).
    #[cfg(feature = "parity")]
    pub fn forward_with_debug(
        &self,
        hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
    ) -> Result<(Tensor, DpirDebug)> {
        let control = self.control_features(controlnet_cond)?;
        let (out, dbg) =
            self.run(hidden_states, &control, encoder_hidden_states, pooled_projections, timestep, true)?;
        Ok((out, dbg.expect("debug requested")))
    }

    fn run(
        &self,
        hidden_states: &Tensor,
        control: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
        debug: bool,
    ) -> Result<(Tensor, Option<Intermediates>)> {
        let dt = self.dtype();
        let (b, h, w) = self.check_latent(hidden_states, "hidden_states")?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let (cb, _, ch, cw) = control.dims4()?;
        if cb != b || ch != gh || cw != gw {
            candle_core::bail!(
                "control features {:?} do not match the latent's {b}x{gh}x{gw} patch grid",
                control.dims()
            );
        }

        let mut x = self.patch_embed(&hidden_states.to_dtype(dt)?)?;
        let temb = self.temb(timestep, pooled_projections)?;
        let temb_silu = temb.silu()?;
        let mut ctx = self.context_embedder.forward(&encoder_hidden_states.to_dtype(dt)?)?;
        let control_tokens = control.flatten_from(2)?.transpose(1, 2)?; // b c h w -> b (h w) c
        let mut dbg = debug.then(|| Intermediates {
            patch_embed: x.clone(),
            temb: temb.clone(),
            context_embedded: ctx.clone(),
            control_conv_out: control.clone(),
            block0_out_hidden: x.clone(),
            block0_out_context: ctx.clone(),
            after_block0_plus_control: x.clone(),
        });

        for (i, block) in self.blocks.iter().enumerate() {
            let (c, nx) = block.forward(&x, &ctx, &temb_silu)?;
            x = nx;
            if i == 0 {
                if let Some(d) = dbg.as_mut() {
                    d.block0_out_hidden = x.clone();
                    d.block0_out_context = c.clone().unwrap_or_else(|| ctx.clone());
                }
                x = (&x + align(&control_tokens, &x)?)?;
                if let Some(d) = dbg.as_mut() {
                    d.after_block0_plus_control = x.clone();
                }
            }
            if let Some(c) = c {
                ctx = c;
            }
        }

        let x = self.norm_out.forward(&x, &temb_silu)?;
        let x = self.proj_out.forward(&x)?; // [B, gh*gw, p*p*c]
        let c = self.cfg.out_channels;
        let out = x
            .reshape((b, gh, gw, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))? // n h w p q c -> n c h p w q
            .reshape((b, c, h, w))?;
        Ok((out, dbg))
    }
}

/// Adaptive feature alignment (DESIGN §1): `(c − mean c)/(std c + 1e-9)·std h + mean h`, one
/// scalar mean/std per sample over tokens × channels, unbiased std (torch.std).
fn align(c: &Tensor, h: &Tensor) -> Result<Tensor> {
    let dt = h.dtype();
    let sdt = stats_dtype(dt);
    let stats = |t: &Tensor| -> Result<(Tensor, Tensor)> {
        let b = t.dim(0)?;
        let f = t.to_dtype(sdt)?.reshape((b, ()))?;
        let n = f.dim(1)?;
        let mean = f.mean_keepdim(1)?;
        let var = (f.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n.saturating_sub(1).max(1)) as f64)?;
        Ok((mean.unsqueeze(2)?, var.sqrt()?.unsqueeze(2)?))
    };
    let (mc, sc) = stats(c)?;
    let (mh, sh) = stats(h)?;
    let gain = sh.broadcast_div(&(sc + ALIGN_EPS)?)?;
    c.to_dtype(sdt)?.broadcast_sub(&mc)?.broadcast_mul(&gain)?.broadcast_add(&mh)?.to_dtype(dt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_diffusers_json() {
        // SD3-medium `transformer/config.json` (diffusers keys; unknown ones ignored).
        let j = r#"{"_class_name":"SD3Transformer2DModel","_diffusers_version":"0.29.0.dev0",
            "attention_head_dim":64,"caption_projection_dim":1536,"in_channels":16,
            "joint_attention_dim":4096,"num_attention_heads":24,"num_layers":24,"out_channels":16,
            "patch_size":2,"pooled_projection_dim":2048,"pos_embed_max_size":192,"sample_size":128}"#;
        let c: DpirTransformerConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c, DpirTransformerConfig::sd3_medium());
        assert_eq!(c.inner_dim(), 1536);
    }

    /// The sinusoid frequencies bit for bit against torch 2.4's `get_timestep_embedding`
    /// (`exp(-ln(10000) * arange(0, 128, dtype=float32) / 128)`), as f32 bit patterns.
    #[test]
    fn timestep_frequencies_are_torch_s_bit_for_bit() {
        let f = timestep_freqs();
        assert_eq!(f.len(), 128);
        let torch = [(0, 1065353216u32), (1, 1064188408), (2, 1063104470), (64, 1008981770), (127, 954293390)];
        for (i, bits) in torch {
            assert_eq!(f[i].to_bits(), bits, "frequency {i}: {} vs torch {}", f[i], f32::from_bits(bits));
        }
    }
}
