// zstd for qcow2 images with compression_type=zstd (Debian: libzstd-dev).
#pragma once
#include <zstd.h>
