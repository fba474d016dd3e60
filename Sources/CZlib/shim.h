// zlib for qcow2 deflate clusters (Debian: zlib1g-dev).
#pragma once
#include <zlib.h>
