// swift-tools-version: 6.0
//
// Swiftlet: a minimal virtual machine monitor over Linux /dev/kvm.
//
// Module map (each has one job; see docs/architecture.md):
//   Basics     Small helpers every module shares: hex, sizes, endian reads, clock, threads.
//   CLinux     C shim for the few Linux calls Swift cannot import (thread names, ...).
//   EventLoop  Owned descriptors, eventfd, timerfd, signalfd and the epoll loop. No KVM.
//   Layout     The x86 address map and how interrupt lines are given out: one file.
//   CKVM       C shim: <linux/kvm.h> request numbers and fixed-arity ioctl wrappers.
//   KVM        Typed Swift layer over the KVM ioctls (system, VM, vCPU).
//   Memory     Guest RAM: anonymous mmap, layout around the MMIO hole, checked translation.
//   Devices    Device models and buses (UART, exit port, ...). No KVM: unit-testable.
//   Compression  zlib and zstd decompression (with libdeflate when present): the one home for both.
//   DiskImage  Raw and qcow2 disk images over file descriptors. No KVM.
//   Boot       Kernel formats and boot protocols (flat, Linux, PVH, Multiboot), and the
//              firmware tables that describe the Devices. No KVM.
//   RateLimit  Token buckets and rate limiters (Firecracker's semantics) for device I/O. No KVM.
//   Virtio     Virtqueues, the virtio device interface, transports and devices. No KVM.
//   X86        x86 vCPU set-up: the CPU model (CPUID), boot MSRs, entry registers, dumps.
//   Snapshot   The snapshot state file's envelope: format version, length, checksum. No KVM.
//   Sandbox    Confines Swiftlet's threads: seccomp-BPF filters per thread kind (written as
//              data, compiled by our own BPF assembler), no_new_privs, Landlock; the jailer.
//   Machine    Puts it together: VM, vCPU threads, exit loop, console.
//   SwiftletKit  The library: configure a VM, run it, get its exit and console (the API
//              the CLI and test suites use).
//   API        Firecracker's REST API without sockets: request and response models, what may
//              be called when, the mapping to SwiftletKit, metrics and logging set-up.
//   APIServer  The API's HTTP/1.1 server on a Unix socket (SwiftNIO), on threads named "api".
//   swiftlet   The command-line tool, a thin layer over SwiftletKit.
import PackageDescription

let package = Package(
    name: "Swiftlet",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "swiftlet", targets: ["swiftlet"]),
        /// Run VMs in process: for test suites that boot tiny guests (see docs/library.md).
        .library(name: "SwiftletKit", targets: ["SwiftletKit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        .target(name: "CLinux"),
        .target(name: "Basics", dependencies: ["CLinux"]),
        .target(name: "Layout"),
        .target(name: "EventLoop", dependencies: ["Basics", "CLinux"]),
        .target(name: "CKVM"),
        .target(name: "CSandbox"),
        .target(name: "Sandbox", dependencies: ["CSandbox", "CKVM"]),
        .target(name: "KVM", dependencies: ["Basics", "CKVM"]),
        .target(name: "Memory", dependencies: ["Basics", "CLinux", "Layout"]),
        .target(name: "Devices", dependencies: ["Basics", "Memory", "Layout", .product(name: "DequeModule", package: "swift-collections")]),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .target(name: "Compression", dependencies: ["CZlib", "CZstd"]),
        .target(name: "DiskImage", dependencies: ["Basics", "CLinux", "Compression", "CZlib", "CZstd"]),
        .systemLibrary(name: "CLzma", path: "Sources/CLzma"),
        .systemLibrary(name: "CLz4", path: "Sources/CLz4"),
        .target(name: "Boot", dependencies: ["Basics", "Layout", "Memory", "Devices", "Compression", "CLzma", "CLz4"]),
        .target(name: "X86", dependencies: ["Basics", "KVM", "Boot"]),
        .target(name: "RateLimit"),
        .target(name: "Virtio", dependencies: ["Basics", "CLinux", "Memory", "EventLoop", "Devices", "DiskImage", "RateLimit",
                                         .product(name: "DequeModule", package: "swift-collections")]),
        .target(name: "Snapshot", dependencies: ["Basics", "CZlib"]),
        .target(name: "Machine", dependencies: ["Basics", "Layout", "EventLoop", "Virtio", "DiskImage", "X86", "KVM", "Memory", "Devices", "Boot", "Snapshot", "RateLimit", "Sandbox", "Compression"]),
        .target(name: "SwiftletKit", dependencies: ["Basics", "Sandbox", "Machine", "Devices", "DiskImage", "Virtio", "X86", "KVM", "RateLimit"]),
        .target(name: "API", dependencies: ["Basics", "Boot", "CLinux", "SwiftletKit", "RateLimit", .product(name: "Logging", package: "swift-log")]),
        .target(name: "APIServer", dependencies: ["API", "Basics", "CLinux", "Sandbox",
                                                 .product(name: "NIOCore", package: "swift-nio"),
                                                 .product(name: "NIOPosix", package: "swift-nio"),
                                                 .product(name: "NIOHTTP1", package: "swift-nio"),
                                                 .product(name: "Logging", package: "swift-log")]),
        .executableTarget(
            name: "swiftlet",
            dependencies: [
                "Basics", "SwiftletKit", "DiskImage", "RateLimit", "API", "APIServer", "Sandbox",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "BasicsTests", dependencies: ["Basics"]),
        .testTarget(name: "EventLoopTests", dependencies: ["EventLoop", "Basics"]),
        .testTarget(name: "KVMTests", dependencies: ["Basics", "KVM", "Memory", "EventLoop"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "Memory", "EventLoop", "Devices", "DiskImage", "RateLimit"]),
        .testTarget(name: "RateLimitTests", dependencies: ["RateLimit"]),
        .testTarget(name: "MemoryTests", dependencies: ["Memory"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "Memory", "Layout"]),
        .testTarget(name: "DiskImageTests", dependencies: ["DiskImage", "Compression"], exclude: ["Fixtures"]),
        .testTarget(name: "BootTests", dependencies: ["Boot", "Layout", "Memory", "Devices", "CZlib", "CZstd", "CLzma", "CLz4"]),
        .testTarget(name: "X86Tests", dependencies: ["X86", "KVM", "Memory"], exclude: ["Fixtures"]),
        .testTarget(name: "SwiftletIntegrationTests", dependencies: ["swiftlet", "Sandbox"]),
        .testTarget(name: "SwiftletKitTests", dependencies: ["SwiftletKit", "RateLimit"]),
        .testTarget(name: "SnapshotTests", dependencies: ["Snapshot"]),
        .testTarget(name: "APITests", dependencies: ["API", "APIServer", "SwiftletKit",
                                                    .product(name: "NIOCore", package: "swift-nio"),
                                                    .product(name: "NIOEmbedded", package: "swift-nio"),
                                                    .product(name: "NIOHTTP1", package: "swift-nio")]),
        .testTarget(name: "SandboxTests", dependencies: ["Sandbox", "CKVM"]),
    ],
    swiftLanguageModes: [.v6]
)
