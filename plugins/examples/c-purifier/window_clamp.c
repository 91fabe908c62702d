/* window_clamp: an adverse purifier written in C against include/adverse_plugin.h.
 *
 * Clamps every frame's stored values to its DICOM VOI window (widened on both sides by
 * `margin` window widths), mapped to stored units through the rescale slope/intercept: values
 * outside the window are invisible to a reader anyway, and an attack's out-of-window changes
 * are removed. Frames without a window pass through unchanged. Audit values per frame:
 * `clamped` (how many values moved) and `has_window`.
 *
 * Build: cc -shared -fPIC -I ../../sdk/include -o libwindow_clamp.so window_clamp.c
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adverse_plugin.h"

typedef struct {
  double margin;
} Instance;

static void fail(const AdvHost *host, const char *msg) { host->set_error(host->ctx, msg, strlen(msg)); }

/* Reads `"margin": <number>` from the (schema-validated) parameters; default 0. */
static double parse_margin(const char *json, size_t len) {
  char buf[512];
  size_t n = len < sizeof buf - 1 ? len : sizeof buf - 1;
  memcpy(buf, json, n);
  buf[n] = 0;
  const char *p = strstr(buf, "\"margin\"");
  if (!p) return 0.0;
  p = strchr(p, ':');
  return p ? strtod(p + 1, NULL) : 0.0;
}

static AdvStatus wc_create(const AdvHost *host, const char *params, size_t len, void **out) {
  Instance *inst = malloc(sizeof *inst);
  if (!inst) {
    fail(host, "out of memory");
    return ADV_ERR_FAILED;
  }
  inst->margin = parse_margin(params, len);
  *out = inst;
  return ADV_OK;
}

static AdvStatus wc_process(void *instance, const AdvHost *host, const AdvBatch *batch) {
  Instance *inst = instance;
  uint64_t shape[8];
  uint32_t ndim = 0;
  if (host->tensor_shape(host->ctx, batch->input, shape, 8, &ndim) != ADV_OK || ndim != 4) {
    fail(host, "input is not [N, C, H, W]");
    return ADV_ERR_FAILED;
  }
  size_t total = (size_t)(shape[0] * shape[1] * shape[2] * shape[3]);
  size_t per = total / (size_t)shape[0];
  float *data = malloc(total * sizeof(float));
  if (!data) {
    fail(host, "out of memory");
    return ADV_ERR_FAILED;
  }
  if (host->tensor_download(host->ctx, batch->input, data, total) != ADV_OK) {
    free(data);
    fail(host, "download failed");
    return ADV_ERR_FAILED;
  }
  for (uint32_t i = 0; i < batch->frames; i++) {
    AdvFrameMeta m;
    memset(&m, 0, sizeof m);
    m.size = sizeof m;
    if (host->frame_meta(host->ctx, i, &m) != ADV_OK) {
      free(data);
      fail(host, "frame_meta failed");
      return ADV_ERR_FAILED;
    }
    double clamped = 0;
    if (m.has_window && m.window_width > 0 && m.rescale_slope != 0) {
      double half = m.window_width / 2.0 + inst->margin * m.window_width;
      double lo = (m.window_center - half - m.rescale_intercept) / m.rescale_slope;
      double hi = (m.window_center + half - m.rescale_intercept) / m.rescale_slope;
      if (lo > hi) {
        double t = lo;
        lo = hi;
        hi = t;
      }
      lo = ceil(lo);
      hi = floor(hi);
      float *f = data + (size_t)i * per;
      for (size_t k = 0; k < per; k++) {
        if (f[k] < lo) {
          f[k] = (float)lo;
          clamped++;
        } else if (f[k] > hi) {
          f[k] = (float)hi;
          clamped++;
        }
      }
    }
    host->audit_number(host->ctx, i, "clamped", 7, clamped);
    host->audit_flag(host->ctx, i, "has_window", 10, m.has_window);
  }
  AdvTensor out = 0;
  AdvStatus st = host->tensor_upload(host->ctx, data, total, shape, 4, &out);
  free(data);
  if (st != ADV_OK) {
    fail(host, "upload failed");
    return st;
  }
  return host->set_output(host->ctx, out);
}

static void wc_destroy(void *instance) { free(instance); }

static const AdvPluginDesc PLUGINS[] = {{
    .size = sizeof(AdvPluginDesc),
    .kind = ADV_KIND_PURIFIER,
    .name = "window-clamp",
    .version = "0.1.0",
    .description = "Clamp stored values to the frame's VOI window (C example plugin)",
    .param_schema = "{\"type\":\"object\",\"properties\":{\"margin\":{\"type\":\"number\",\"minimum\":0,"
                    "\"maximum\":10,\"description\":\"extra window widths kept on each side\"}},"
                    "\"additionalProperties\":false}",
    .create = wc_create,
    .process = wc_process,
    .destroy = wc_destroy,
}};

/* Overridable so the host's tests can build this file as a library of another ABI version. */
#ifndef WC_ABI_MAJOR
#define WC_ABI_MAJOR ADVERSE_ABI_MAJOR
#endif

static const AdvLibrary LIBRARY = {
    .abi = {.major = WC_ABI_MAJOR, .minor = ADVERSE_ABI_MINOR},
    .size = sizeof(AdvLibrary),
    .plugin_count = 1,
    .plugins = PLUGINS,
    .plugin_desc_size = sizeof(AdvPluginDesc),
};

const AdvLibrary *adverse_plugin_entry(void) { return &LIBRARY; }
