// swift-tools-version: 6.0
//
// Swiftlet: a minimal virtual machine monitor over Linux /dev/kvm.
//
// Module map (each has one job; see docs/architecture.md):
//   CKVM       C shim: <linux/kvm.h> request numbers and fixed-arity ioctl wrappers.
//   KVM        Typed Swift layer over the KVM ioctls (system, VM, vCPU).
//   Memory     Guest RAM: anonymous mmap, layout around the MMIO hole, checked translation.
//   Devices    Device models and buses (UART, exit port, ...). No KVM: unit-testable.
//   DiskImage  Raw and qcow2 disk images over file descriptors. No KVM.
//   Boot       Kernel formats and boot protocols (flat, Linux, PVH, Multiboot). No KVM.
//   Machine    Puts it together: VM, vCPU threads, exit loop, console.
//   swiftlet   The command-line tool.
import PackageDescription

let package = Package(
    name: "Swiftlet",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "swiftlet", targets: ["swiftlet"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .target(name: "CKVM"),
        .target(name: "KVM", dependencies: ["CKVM"]),
        .target(name: "Memory"),
        .target(name: "Devices", dependencies: ["Memory"]),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .target(name: "DiskImage", dependencies: ["CZlib", "CZstd"]),
        .systemLibrary(name: "CLzma", path: "Sources/CLzma"),
        .systemLibrary(name: "CLz4", path: "Sources/CLz4"),
        .target(name: "Boot", dependencies: ["Memory", "CZlib", "CZstd", "CLzma", "CLz4"]),
        .target(name: "Machine", dependencies: ["KVM", "Memory", "Devices", "Boot"]),
        .executableTarget(
            name: "swiftlet",
            dependencies: [
                "Machine", "DiskImage",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "MemoryTests", dependencies: ["Memory"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "Memory"]),
        .testTarget(name: "DiskImageTests", dependencies: ["DiskImage"], exclude: ["Fixtures"]),
        .testTarget(name: "BootTests", dependencies: ["Boot", "Memory", "CZlib", "CZstd", "CLzma", "CLz4"]),
        .testTarget(name: "SwiftletIntegrationTests", dependencies: ["swiftlet"]),
    ],
    swiftLanguageModes: [.v6]
)
