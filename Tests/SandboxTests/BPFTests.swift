import Testing
@testable import Sandbox

@Suite struct BPFAssemblerTests {
    @Test func everyKindsFilterAssembles() throws {
        for kind in ThreadKind.allCases {
            let program = try kind.filter().compile()
            #expect(program.count > 4 && program.count < 512, "\(kind): \(program.count) instructions")
        }
    }
}
