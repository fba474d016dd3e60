import Basics

/// The setup header of a bzImage (Linux `Documentation/x86/boot.rst`, "The real-mode
/// kernel header"), parsed from the file at offset 0x1F1 and checked against what the
/// 64-bit boot protocol needs. Owns the decoded fields and the raw header bytes, which the
/// loader copies into the zero page.
public struct SetupHeader: Sendable, Equatable {
    // Offsets inside the file (and inside boot_params, where the header sits at the same place).
    static let setupSectsOffset = 0x1F1
    static let bootFlagOffset = 0x1FE
    static let jumpOffset = 0x200
    static let magicOffset = 0x202
    static let versionOffset = 0x206
    static let loadflagsOffset = 0x211
    static let code32StartOffset = 0x214
    static let syssizeOffset = 0x1F4
    static let initrdAddrMaxOffset = 0x22C
    static let kernelAlignmentOffset = 0x230
    static let relocatableOffset = 0x234
    static let xloadflagsOffset = 0x236
    static let cmdlineSizeOffset = 0x238
    static let payloadOffsetOffset = 0x248
    static let payloadLengthOffset = 0x24C
    static let prefAddressOffset = 0x258
    static let initSizeOffset = 0x260
    /// boot_params reserves up to 0x290 for the header.
    static let headerLimit = 0x290

    public static let bootFlag: UInt16 = 0xAA55
    /// "HdrS" little-endian.
    public static let magic: UInt32 = 0x5372_6448
    public static let minimumVersion: UInt16 = 0x0206

    public static let loadedHigh: UInt8 = 1 << 0
    public static let xlfKernel64: UInt16 = 1 << 0
    public static let xlfCanBeLoadedAbove4G: UInt16 = 1 << 1

    /// Number of 512-byte setup sectors after the boot sector (0 means 4).
    public let setupSects: UInt8
    public let version: UInt16
    public let loadflags: UInt8
    public let xloadflags: UInt16
    public let code32Start: UInt32
    /// Size of the protected-mode code in 16-byte paragraphs.
    public let syssize: UInt32
    /// Highest address the last byte of the initrd may occupy.
    public let initrdAddrMax: UInt32
    public let kernelAlignment: UInt32
    public let relocatable: Bool
    /// Longest command line in bytes, without the terminating NUL.
    public let cmdlineSize: UInt32
    /// Offset of the compressed payload inside the protected-mode code.
    public let payloadOffset: UInt32
    public let payloadLength: UInt32
    public let prefAddress: UInt64
    /// Linear memory the kernel needs from its load address while it decompresses and boots.
    public let initSize: UInt32
    /// The header bytes [0x1F1, end), copied into the zero page.
    public let rawHeader: [UInt8]

    /// File offset of the protected-mode kernel.
    public var protectedModeOffset: Int { (Int(setupSects == 0 ? 4 : setupSects) + 1) * 512 }
    /// Size of the protected-mode kernel in bytes.
    public var protectedModeSize: UInt64 { UInt64(syssize) * 16 }
    public var has64BitEntry: Bool { xloadflags & Self.xlfKernel64 != 0 }

    /// `true` when `bytes` has the boot flag and the "HdrS" magic.
    public static func matches(_ bytes: [UInt8]) -> Bool {
        bytes.le(UInt16.self, at: bootFlagOffset) == bootFlag && bytes.le(UInt32.self, at: magicOffset) == magic
    }

    /// Parses the header of `bytes` and checks version, 64-bit entry, alignment and that
    /// the file holds the whole protected-mode kernel and payload.
    public init(_ bytes: [UInt8]) throws(BootError) {
        guard Self.matches(bytes) else { throw .notAKernel(reason: "no bzImage boot flag and HdrS magic") }
        guard let version = bytes.le(UInt16.self, at: Self.versionOffset) else {
            throw .truncated(what: "the setup header", needed: 0x208, available: UInt64(bytes.count))
        }
        guard version >= Self.minimumVersion else { throw .unsupportedBootProtocol(version: version) }
        // The header is 0x202 + the second byte of the jump instruction long.
        let jump = Int(bytes.count > Self.jumpOffset + 1 ? bytes[Self.jumpOffset + 1] : 0)
        let headerEnd = min(Self.magicOffset + jump, Self.headerLimit)
        // 2.06 ends with cmdline_size (0x23C); newer versions reach init_size and beyond.
        let needed = max(headerEnd, 0x23C)
        guard bytes.count >= needed else {
            throw .truncated(what: "the setup header", needed: UInt64(needed), available: UInt64(bytes.count))
        }
        func field<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int, since minimum: UInt16) -> T {
            version >= minimum && offset + MemoryLayout<T>.size <= headerEnd ? (bytes.le(T.self, at: offset) ?? 0) : 0
        }
        setupSects = bytes[Self.setupSectsOffset]
        self.version = version
        loadflags = bytes[Self.loadflagsOffset]
        code32Start = bytes.le(UInt32.self, at: Self.code32StartOffset) ?? 0
        syssize = bytes.le(UInt32.self, at: Self.syssizeOffset) ?? 0
        initrdAddrMax = field(UInt32.self, Self.initrdAddrMaxOffset, since: 0x0203)
        kernelAlignment = field(UInt32.self, Self.kernelAlignmentOffset, since: 0x0205)
        relocatable = field(UInt8.self, Self.relocatableOffset, since: 0x0205) != 0
        xloadflags = field(UInt16.self, Self.xloadflagsOffset, since: 0x020C)
        cmdlineSize = field(UInt32.self, Self.cmdlineSizeOffset, since: 0x0206)
        payloadOffset = field(UInt32.self, Self.payloadOffsetOffset, since: 0x0208)
        payloadLength = field(UInt32.self, Self.payloadLengthOffset, since: 0x0208)
        prefAddress = field(UInt64.self, Self.prefAddressOffset, since: 0x020A)
        initSize = field(UInt32.self, Self.initSizeOffset, since: 0x020A)
        rawHeader = Array(bytes[Self.setupSectsOffset..<headerEnd])

        guard loadflags & Self.loadedHigh != 0 else {
            throw .invalidHeader("LOADED_HIGH is clear: a zImage loaded at 0x10000 is not supported")
        }
        guard has64BitEntry else { throw .no64BitEntry }
        guard cmdlineSize > 0 else { throw .invalidHeader("cmdline_size is 0") }
        if relocatable {
            guard kernelAlignment != 0, kernelAlignment & (kernelAlignment - 1) == 0 else {
                throw .invalidHeader("kernel_alignment \(Hex.prefixed(UInt64(kernelAlignment))) is not a power of two")
            }
        }
        guard syssize > 0 else { throw .invalidHeader("syssize is 0: no protected-mode kernel") }
        let pmEnd = UInt64(protectedModeOffset) + protectedModeSize
        guard UInt64(bytes.count) >= pmEnd else {
            throw .truncated(what: "the protected-mode kernel (setup_sects, syssize)", needed: pmEnd, available: UInt64(bytes.count))
        }
        if version >= 0x0208, payloadLength > 0 {
            let payloadEnd = UInt64(payloadOffset) + UInt64(payloadLength)
            guard payloadEnd <= protectedModeSize else {
                throw .truncated(what: "the compressed payload (payload_offset, payload_length)",
                                 needed: UInt64(protectedModeOffset) + payloadEnd, available: pmEnd)
            }
        }
    }

    /// The compressed payload (`payload_offset`/`payload_length`), empty before 2.08.
    public func payload(of bytes: [UInt8]) -> ArraySlice<UInt8> {
        guard version >= 0x0208, payloadLength > 0 else { return [] }
        let start = protectedModeOffset + Int(payloadOffset)
        let end = start + Int(payloadLength)
        guard end <= bytes.count else { return [] }
        return bytes[start..<end]
    }
}
