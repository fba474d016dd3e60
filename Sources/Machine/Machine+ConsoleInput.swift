extension Machine {
    /// Types `bytes` into the guest's serial port (COM1), as standard input forwarding
    /// does: they wait in the UART's receive FIFO (and behind it, up to
    /// ``Serial16550/pendingInputLimit`` bytes) for the guest to read, and raise its
    /// receive interrupt if the guest enabled it. Allowed from any thread in any state,
    /// also while paused (the bytes are then part of the UART's state in a snapshot).
    /// Returns how many bytes were taken; the rest are dropped.
    @discardableResult
    public func typeOnConsole(_ bytes: [UInt8]) -> Int {
        board.serial.receive(bytes)
    }
}
