// liblzma for xz-compressed bzImage payloads decompressed on the host (Debian: liblzma-dev).
#pragma once
#include <lzma.h>
