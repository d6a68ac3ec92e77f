// S3N's bilinear sampler as an MXNet extension operator (lib_api, MXNet >= 1.7), CPU, OpenMP.
//
// Same arithmetic as MXNet's BilinearSampler (src/operator/bilinear_sampler.cc), whose CPU kernel
// runs on one thread: for output pixel (n, c, h, w) with grid g = grid[n, :, h, w] in [-1, 1],
//   x = (g_x + 1) (W_in - 1) / 2,  y = (g_y + 1) (H_in - 1) / 2,  x0 = floor(x), y0 = floor(y),
//   wx = 1 - (x - x0),  wy = 1 - (y - y0)        (weights of the top-left corner)
//   out = v(y0, x0) wy wx + v(y0, x0+1) wy (1-wx) + v(y0+1, x0) (1-wy) wx + v(y0+1, x0+1) (1-wy) (1-wx)
// where a corner outside the image reads 0 (and receives no gradient).
//
// Op "s3n_bilinear_sampler": inputs data N×C×H_in×W_in, grid N×2×H×W (float32); output N×C×H×W.
// Backward: d data (scatter of the four corners, one thread per (n, c) plane: no write conflicts)
// and d grid (one thread per output row).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <vector>
#include <omp.h>
#include <mxnet/lib_api.h>

using namespace mxnet::ext;

namespace {

// MXNet runs operators on engine threads whose OpenMP default is one thread; like MXNet's own
// kernels, use OMP_NUM_THREADS when set, else every processor
int num_threads() {
  static const int threads = [] {
    const char* env = std::getenv("OMP_NUM_THREADS");
    const int from_env = env ? std::atoi(env) : 0;
    return from_env > 0 ? from_env : omp_get_num_procs();
  }();
  return threads;
}

struct Corners {
  int x0, y0;
  float wx, wy;          // weights of the top-left corner along x and y
  bool in[4];            // top-left, top-right, bottom-left, bottom-right inside the image
};

inline void corners(float gx, float gy, int in_h, int in_w, Corners* c) {
  const float x = (gx + 1) * (in_w - 1) / 2;
  const float y = (gy + 1) * (in_h - 1) / 2;
  c->x0 = static_cast<int>(std::floor(x));
  c->y0 = static_cast<int>(std::floor(y));
  c->wx = 1.0f - (x - c->x0);
  c->wy = 1.0f - (y - c->y0);
  const bool x_in0 = c->x0 >= 0 && c->x0 <= in_w - 1, x_in1 = c->x0 + 1 >= 0 && c->x0 + 1 <= in_w - 1;
  const bool y_in0 = c->y0 >= 0 && c->y0 <= in_h - 1, y_in1 = c->y0 + 1 >= 0 && c->y0 + 1 <= in_h - 1;
  c->in[0] = x_in0 && y_in0;
  c->in[1] = x_in1 && y_in0;
  c->in[2] = x_in0 && y_in1;
  c->in[3] = x_in1 && y_in1;
}

MXReturnValue parseAttrs(const std::unordered_map<std::string, std::string>& attrs,
                         int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue inferType(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<int>* in_types, std::vector<int>* out_types) {
  for (int t : *in_types) {
    if (t != kFloat32) {
      MX_ERROR_MSG << "s3n_bilinear_sampler: expected float32 data and grid";
      return MX_FAIL;
    }
  }
  (*out_types)[0] = kFloat32;
  return MX_SUCCESS;
}

MXReturnValue inferShape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in_shapes,
                         std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& data = (*in_shapes)[0];
  const auto& grid = (*in_shapes)[1];
  if (data.size() != 4 || grid.size() != 4 || grid[1] != 2 || grid[0] != data[0]) {
    MX_ERROR_MSG << "s3n_bilinear_sampler: expected data N×C×H×W and grid N×2×H'×W'";
    return MX_FAIL;
  }
  (*out_shapes)[0] = {data[0], data[1], grid[2], grid[3]};
  return MX_SUCCESS;
}

// Corner offsets and masked weights of one output row, so that the channel loops below are
// straight-line code the compiler vectorises (AVX2 gathers where the CPU has them: target_clones
// builds both versions and picks one at load time). A corner outside the image gets weight 0 at a
// clamped (valid) offset, which is the "reads 0" rule.
struct RowTaps {
  std::vector<int64_t> offset[4];
  std::vector<float> weight[4];
  explicit RowTaps(int width) {
    for (int k = 0; k < 4; ++k) { offset[k].resize(width); weight[k].resize(width); }
  }
};

void row_taps(const float* gx, const float* gy, int out_w, int in_h, int in_w, RowTaps* taps) {
  for (int w = 0; w < out_w; ++w) {
    Corners c;
    corners(gx[w], gy[w], in_h, in_w, &c);
    const int xs[4] = {c.x0, c.x0 + 1, c.x0, c.x0 + 1}, ys[4] = {c.y0, c.y0, c.y0 + 1, c.y0 + 1};
    const float weights[4] = {c.wy * c.wx, c.wy * (1 - c.wx), (1 - c.wy) * c.wx, (1 - c.wy) * (1 - c.wx)};
    for (int k = 0; k < 4; ++k) {
      const int x = std::min(std::max(xs[k], 0), in_w - 1), y = std::min(std::max(ys[k], 0), in_h - 1);
      taps->offset[k][w] = static_cast<int64_t>(y) * in_w + x;
      taps->weight[k][w] = c.in[k] ? weights[k] : 0.0f;
    }
  }
}

__attribute__((target_clones("avx2", "default")))
void sample_row(const float* __restrict plane, const RowTaps& taps, int out_w, float* __restrict out) {
  const int64_t *o0 = taps.offset[0].data(), *o1 = taps.offset[1].data(),
                *o2 = taps.offset[2].data(), *o3 = taps.offset[3].data();
  const float *w0 = taps.weight[0].data(), *w1 = taps.weight[1].data(),
              *w2 = taps.weight[2].data(), *w3 = taps.weight[3].data();
  for (int w = 0; w < out_w; ++w)
    out[w] = plane[o0[w]] * w0[w] + plane[o1[w]] * w1[w] + plane[o2[w]] * w2[w] + plane[o3[w]] * w3[w];
}

MXReturnValue forward(const std::unordered_map<std::string, std::string>& attrs,
                      std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                      const OpResource& res) {
  const MXTensor& data_t = (*inputs)[0];
  const MXTensor& grid_t = (*inputs)[1];
  const float* data = (*inputs)[0].data<float>();
  const float* grid = (*inputs)[1].data<float>();
  float* out = (*outputs)[0].data<float>();
  const int n_batch = data_t.shape[0], channels = data_t.shape[1];
  const int in_h = data_t.shape[2], in_w = data_t.shape[3];
  const int out_h = grid_t.shape[2], out_w = grid_t.shape[3];
  const int64_t in_plane = static_cast<int64_t>(in_h) * in_w, out_plane = static_cast<int64_t>(out_h) * out_w;
#pragma omp parallel num_threads(num_threads())
  {
    RowTaps taps(out_w);
#pragma omp for collapse(2) schedule(static)
    for (int n = 0; n < n_batch; ++n) {
      for (int h = 0; h < out_h; ++h) {
        const float* gx = grid + (2 * n) * out_plane + h * out_w;
        row_taps(gx, gx + out_plane, out_w, in_h, in_w, &taps);
        for (int ch = 0; ch < channels; ++ch) {
          const int64_t plane = static_cast<int64_t>(n) * channels + ch;
          sample_row(data + plane * in_plane, taps, out_w, out + plane * out_plane + h * out_w);
        }
      }
    }
  }
  return MX_SUCCESS;
}

// inputs: output gradient, data, grid (then the forward output); outputs: d data, d grid
MXReturnValue backward(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                       const OpResource& res) {
  const float* ograd = (*inputs)[0].data<float>();
  MXTensor& data_t = (*inputs)[1];
  MXTensor& grid_t = (*inputs)[2];
  const float* data = data_t.data<float>();
  const float* grid = grid_t.data<float>();
  float* gdata = (*outputs)[0].data<float>();
  float* ggrid = (*outputs)[1].data<float>();
  const int n_batch = data_t.shape[0], channels = data_t.shape[1];
  const int in_h = data_t.shape[2], in_w = data_t.shape[3];
  const int out_h = grid_t.shape[2], out_w = grid_t.shape[3];
  const int64_t in_plane = static_cast<int64_t>(in_h) * in_w, out_plane = static_cast<int64_t>(out_h) * out_w;
  // d data: each (n, c) plane is written by one thread
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int plane_index = 0; plane_index < n_batch * channels; ++plane_index) {
    const int n = plane_index / channels;
    float* gplane = gdata + plane_index * in_plane;
    std::memset(gplane, 0, sizeof(float) * in_plane);
    const float* go = ograd + plane_index * out_plane;
    const float* gx = grid + (2 * n) * out_plane;
    const float* gy = gx + out_plane;
    for (int64_t i = 0; i < out_plane; ++i) {
      Corners c;
      corners(gx[i], gy[i], in_h, in_w, &c);
      const int64_t tl = c.y0 * static_cast<int64_t>(in_w) + c.x0;
      const float g = go[i];
      if (c.in[0]) gplane[tl] += g * c.wy * c.wx;
      if (c.in[1]) gplane[tl + 1] += g * c.wy * (1 - c.wx);
      if (c.in[2]) gplane[tl + in_w] += g * (1 - c.wy) * c.wx;
      if (c.in[3]) gplane[tl + in_w + 1] += g * (1 - c.wy) * (1 - c.wx);
    }
  }
  // d grid: each output position is written by one thread
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads())
  for (int n = 0; n < n_batch; ++n) {
    for (int h = 0; h < out_h; ++h) {
      const int64_t row = (2 * n) * out_plane + h * out_w;
      for (int w = 0; w < out_w; ++w) {
        Corners c;
        corners(grid[row + w], grid[row + out_plane + w], in_h, in_w, &c);
        const int64_t tl = c.y0 * static_cast<int64_t>(in_w) + c.x0;
        float dx = 0, dy = 0;
        for (int ch = 0; ch < channels; ++ch) {
          const int64_t plane = static_cast<int64_t>(n) * channels + ch;
          const float* p = data + plane * in_plane;
          const float g = ograd[plane * out_plane + h * out_w + w];
          const float v_tl = c.in[0] ? p[tl] : 0.0f;
          const float v_tr = c.in[1] ? p[tl + 1] : 0.0f;
          const float v_bl = c.in[2] ? p[tl + in_w] : 0.0f;
          const float v_br = c.in[3] ? p[tl + in_w + 1] : 0.0f;
          // out = v_tl wy wx + v_tr wy (1-wx) + v_bl (1-wy) wx + v_br (1-wy)(1-wx); dwx/dx = dwy/dy = -1
          dx -= g * (c.wy * (v_tl - v_tr) + (1 - c.wy) * (v_bl - v_br));
          dy -= g * (c.wx * (v_tl - v_bl) + (1 - c.wx) * (v_tr - v_br));
        }
        ggrid[row + w] = dx * (in_w - 1) / 2;
        ggrid[row + out_plane + w] = dy * (in_h - 1) / 2;
      }
    }
  }
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(s3n_bilinear_sampler)
    .setParseAttrs(parseAttrs)
    .setInferType(inferType)
    .setInferShape(inferShape)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");

MXReturnValue initialize(int version) {
  if (version < 10700) {
    MX_ERROR_MSG << "s3n_bilinear_sampler: MXNet >= 1.7 is needed, got version " << version;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}
