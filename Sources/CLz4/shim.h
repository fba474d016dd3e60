// liblz4 for LZ4 (legacy frame) bzImage payloads decompressed on the host (Debian: liblz4-dev).
#pragma once
#include <lz4.h>
